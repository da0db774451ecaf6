"""Tiny random Llama folders for the quant tests (real SmolLM2 tokenizer, so the real text pipeline runs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import DecoderConfig
from models.decoder import Decoder

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "rms_norm_eps": 1e-5, "max_position_embeddings": 1024, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "attention_bias": False,
    "mlp_bias": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "dtype": "bfloat16",
}


def tiny_decoder(hf: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32) -> Decoder:
    """Random weights with a few outlier channels in the norms (what SmoothQuant is for)."""
    cfg = DecoderConfig.from_hf_dict(hf or TINY)
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[:: max(1, p.numel() // 3)] *= 25.0  # outlier channels
            else:
                p.normal_(0, 0.05)
    return model.to(dtype).eval()


def write_tiny_folder(folder: Path, tokenizer_from: Path, hf: dict | None = None, seed: int = 0) -> Path:
    hf = dict(hf or TINY)
    model = tiny_decoder(hf, seed, torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder
