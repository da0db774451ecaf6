"""CPU engine: our decoder with prepacked oneDNN BF16 linears or INT8 kernels, and a lean decode loop."""

from __future__ import annotations

from pathlib import Path

import torch

from cpu_backend.linear import Int8Linear, Int8WeightOnlyLinear, PackedBF16Linear, fuse_int8
from cpu_backend.threads import configure_threads
from models.backend import RequestError
from models.chat import load_tokenizer
from models.decoder import Decoder
from models.generate import Generator, GeneratorBackend
from models.registry import resolve
from models.weights import load_decoder

CPU_SCHEMES = ("bf16", "w8a16-int8", "w8a8-int8")
NOT_ON_CPU = {"w8a8-fp8": "FP8 has no CPU kernels here; it runs on the GPU backend"}
MAX_CONTEXT = 8192


class CPUEngine(GeneratorBackend):
    name = "cpu"
    SCHEMES = CPU_SCHEMES

    def __init__(
        self,
        model: str,
        scheme: str = "bf16",
        threads: int | None = None,
        max_context: int = MAX_CONTEXT,
        checkpoint: str | Path | None = None,
    ) -> None:
        """``checkpoint``: a built quantized checkpoint folder; by default ``quant.build`` makes or reuses one."""
        if scheme in NOT_ON_CPU:
            raise RequestError(f"scheme {scheme!r} is not available on CPU: {NOT_ON_CPU[scheme]}")
        if scheme not in CPU_SCHEMES:
            raise RequestError(f"scheme {scheme!r} is not available on CPU; choose one of {', '.join(CPU_SCHEMES)}")
        self.threads = configure_threads(threads)
        self.model_spec, self._scheme = model, scheme
        if scheme == "bf16":
            folder = resolve(model)
            decoder = load_decoder(folder, dtype=torch.bfloat16)
            pack_bf16(decoder)
        else:
            folder = Path(checkpoint) if checkpoint else build_checkpoint(model, scheme)
            decoder = load_int8(folder, scheme)
        self.tokenizer = load_tokenizer(folder)
        eos = set(decoder.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        max_len = min(decoder.config.max_position_embeddings, max_context)
        # float32 KV cache: CPU attention matmuls at decode shapes run faster in float32 than in BF16
        self.generator = Generator(decoder, self.tokenizer, eos, max_len, cache_dtype=torch.float32)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""


def build_checkpoint(model: str, scheme: str) -> Path:
    """The shared pipeline's checkpoint for (model, scheme): built once (calibration + SmoothQuant), then cached."""
    import quant

    return quant.build(model, scheme)


def pack_bf16(decoder: Decoder) -> None:
    """Fuse q/k/v and gate/up, then put every projection and the LM head on prepacked oneDNN BF16 linears."""
    decoder.fuse_projections(PackedBF16Linear.fused)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        for i in range(decoder.config.num_layers):
            full = f"model.layers.{i}.{name}"
            decoder.replace_linear(full, PackedBF16Linear.from_linear(decoder.get_submodule(full)))
    decoder.lm_head = PackedBF16Linear.from_linear(decoder.lm_head)


def load_int8(folder: Path, scheme: str) -> Decoder:
    """A quantized checkpoint on our INT8 kernels; linears the quantizer kept in BF16 stay BF16 (prepacked)."""
    from quant.checkpoint import load_checkpoint
    from quant.reference import reference_decoder

    ckpt = load_checkpoint(folder)
    if ckpt.scheme.name != scheme:
        raise RequestError(f"{folder} holds a {ckpt.scheme.name} checkpoint, not {scheme}")
    if ckpt.scheme.kv_cache != "none":
        raise RequestError(f"{folder}: a quantized KV cache ({ckpt.scheme.kv_cache}) is not supported on CPU yet")
    decoder = reference_decoder(ckpt, dtype=torch.bfloat16)  # embeddings, norms, LM head; linears replaced below
    for name in decoder.linear_names():
        weight, weight_scale, input_scale = ckpt.linear(name)
        bias = ckpt.tensors.get(f"{name}.bias")
        if weight_scale is None:
            module = PackedBF16Linear(weight, bias)
        elif scheme == "w8a16-int8":
            module = Int8WeightOnlyLinear(weight, weight_scale, bias)
        else:
            module = Int8Linear(weight, weight_scale, input_scale, bias)
        decoder.replace_linear(name, module)
    decoder.fuse_projections(fuse_int8)
    decoder.lm_head = PackedBF16Linear.from_linear(decoder.lm_head)
    return decoder
