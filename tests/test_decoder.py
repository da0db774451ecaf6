"""Our decoder's logits match transformers' implementation (fp32, tight tolerance)."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from models.config import DecoderConfig, ModelConfigError
from models.weights import CheckpointError, load_decoder

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, tie_word_embeddings=True),
    "llama3-rope-scaling": lambda: LlamaConfig(
        **TINY,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": lambda: MistralConfig(**TINY, head_dim=32, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**TINY),
}


def save_random_model(config, folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random biases too, so a missing Qwen2 q/k/v bias would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return model


def logits_in_chunks(model, ids, chunks):
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start : start + n], cache, start))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_tiny_random_logits_match_transformers(family, tmp_path):
    ref = save_random_model(CONFIGS[family](), tmp_path)
    ours = load_decoder(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        # whole prompt, then prompt + chunk + single-token decode steps through the KV cache
        for chunks in ([40], [25, 10, 1, 1, 1, 1, 1]):
            got = logits_in_chunks(ours, ids, chunks)
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_llama3_scaling_changes_frequencies():
    base = DecoderConfig.from_hf_dict(CONFIGS["llama"]().to_dict())
    scaled = DecoderConfig.from_hf_dict(CONFIGS["llama3-rope-scaling"]().to_dict())
    assert scaled.rope_scaling["factor"] == 8.0 and not base.rope_scaling


def test_embedded_model_logits_match_transformers(embedded_folder):
    ours = load_decoder(embedded_folder, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(embedded_folder, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ref(ids).logits
        got = logits_in_chunks(ours, ids, [20, 1, 1, 1, 1])
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_replace_linear_swaps_the_projection(tmp_path):
    save_random_model(CONFIGS["llama"](), tmp_path)
    model = load_decoder(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(ids, model.new_cache(1, 8), 0)
        zero = torch.nn.Linear(160, 64, bias=False)
        torch.nn.init.zeros_(zero.weight)
        model.replace_linear("model.layers.0.mlp.down_proj", zero)
        after = model(ids, model.new_cache(1, 8), 0)
    assert model.get_submodule("model.layers.0.mlp.down_proj") is zero
    assert not torch.allclose(before, after)
    assert len(model.linear_names()) == 2 * 7


def test_shape_mismatch_is_refused_naming_the_tensor(tmp_path):
    save_random_model(CONFIGS["llama"](), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp.*has shape"):
        load_decoder(tmp_path)


def test_truncated_weights_are_refused(tmp_path):
    save_random_model(CONFIGS["llama"](), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_decoder(tmp_path)


def test_missing_tensor_is_refused(tmp_path):
    save_random_model(CONFIGS["llama"](), tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="v_proj"):
        load_decoder(tmp_path)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ModelConfigError, match="not supported"):
        DecoderConfig.from_hf_dict({"model_type": "gpt2"})
