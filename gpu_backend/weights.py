"""Checkpoint -> GPUDecoder: read BF16 or compressed-tensors 8-bit weights and map each linear to a kernel.

Compressed-tensors layout (what ``quant`` writes): for each linear ``NAME.weight`` (int8 or
float8_e4m3fn [out, in]) and ``NAME.weight_scale`` (float32 [out, 1]), optionally ``NAME.input_scale``
(static activation scale); ``model.layers.N.self_attn.k_scale`` / ``v_scale`` for an 8-bit KV cache.
``load_quantized_linears`` reads exactly those names; ``quantize_weights`` makes the same layout from
BF16 weights (``quant.reference.quantize_weight``: round-to-nearest per output channel, no calibration) for
random-weight benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_backend.model import FP8, GPUDecoder, Layer, Linear
from models.config import DecoderConfig
from models.decoder import LINEAR_SUFFIXES, layer_prefix
from models.weights import read_tensors
from quant.reference import dequantize_weight, quantize_weight
from quant.schemes import get_scheme

DTYPES = {"int": torch.int8, "float": FP8, None: None}  # a scheme's weight / activation type -> torch dtype
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": FP8, "int8": torch.int8}


def load_quantized_linears(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (compressed-tensors or plain BF16) safetensors folder, on the CPU."""
    return read_tensors(Path(folder))


def quantize_weights(state: dict[str, torch.Tensor], cfg: DecoderConfig, weight_type: str) -> dict[str, torch.Tensor]:
    """BF16 state dict -> compressed-tensors names with 8-bit linears (in place; returns ``state``)."""
    for i in range(cfg.num_layers):
        for suffix in LINEAR_SUFFIXES:
            name = layer_prefix(i) + suffix
            q, s = quantize_weight(state[name + ".weight"], weight_type)
            state[name + ".weight"], state[name + ".weight_scale"] = q, s
    return state


def build_from_checkpoint(ckpt, kv_cache: str | None = None, device: str | torch.device = "cuda") -> GPUDecoder:
    """A ``quant.checkpoint.QuantizedCheckpoint`` (what ``quant.build`` writes and ``load_checkpoint`` validates)
    -> GPUDecoder. ``kv_cache`` None: the checkpoint's KV scheme (its calibrated k/v scales), else bf16."""
    have = ckpt.scheme.kv_cache
    if kv_cache is None:
        kv_cache = "bf16" if have == "none" else have
    state = ckpt.tensors
    qmax = {"int8": 127.0, "fp8": 448.0}
    if have in qmax and kv_cache in qmax and kv_cache != have:  # scale = amax / qmax: re-derive for the other type
        state = dict(state)
        for k in [k for k in state if k.endswith(("self_attn.k_scale", "self_attn.v_scale"))]:
            state[k] = state[k] * (qmax[have] / qmax[kv_cache])
    return build_decoder(state, ckpt.config, ckpt.scheme.name, kv_cache, device)


def _linear(state, name, act_dtype, device) -> Linear:
    w = state[name + ".weight"].to(device)
    scale = state.get(name + ".weight_scale")
    bias = state.get(name + ".bias")
    if scale is None:
        return Linear(w.to(torch.bfloat16), bias=None if bias is None else bias.to(device, torch.bfloat16))
    inp = state.get(name + ".input_scale")
    return Linear(
        w,
        scale.to(device, torch.float32).reshape(-1),
        None if inp is None or act_dtype is None else inp.to(device, torch.float32).reshape(1),
        None if bias is None else bias.to(device, torch.bfloat16),
        act_dtype,
    )


def _kv_scale(state, name: str, n_kv: int, kv_dtype: torch.dtype, device) -> torch.Tensor:
    s = state.get(name)
    if kv_dtype == torch.bfloat16:
        return torch.ones(n_kv, device=device)
    if s is None:
        if kv_dtype == torch.int8:
            raise ValueError(
                f"an int8 KV cache needs calibrated scales ({name}); use kv_cache='fp8' or a checkpoint "
                "made with a KV scheme"
            )
        return torch.ones(n_kv, device=device)  # e4m3 covers +-448: unit scale is the usual default
    return s.float().reshape(-1).expand(n_kv).contiguous().to(device)


def build_decoder(
    state: dict[str, torch.Tensor],
    cfg: DecoderConfig,
    scheme: str,
    kv_cache: str = "bf16",
    device: str | torch.device = "cuda",
) -> GPUDecoder:
    formats = get_scheme(scheme).formats
    if kv_cache not in KV_DTYPES:
        raise ValueError(f"unknown KV cache {kv_cache!r}; choose one of {', '.join(KV_DTYPES)}")
    w_dtype, act = DTYPES[formats[0]], DTYPES[formats[1]]
    # a quantized checkpoint: linears with a weight_scale are 8-bit, the others were kept in BF16 by the
    # quantizer (manifest keep_bf16) and run as BF16 GEMMs
    q_dtypes = {v.dtype for k, v in state.items() if k.endswith(".weight") and v.dtype in (torch.int8, FP8)}
    if w_dtype is None and q_dtypes:
        raise ValueError(f"the checkpoint holds {sorted(map(str, q_dtypes))} weights; it cannot run as {scheme}")
    if w_dtype is not None and not q_dtypes:
        state = quantize_weights(dict(state), cfg, formats[0])
    elif w_dtype is not None and q_dtypes != {w_dtype}:
        have = sorted(map(str, q_dtypes))
        raise ValueError(f"scheme {scheme} needs {w_dtype} weights but the checkpoint holds {have}")
    kv_dtype = KV_DTYPES[kv_cache]
    layers = []
    for i in range(cfg.num_layers):
        p = layer_prefix(i)
        lin = {s: _linear(state, p + s, act, device) for s in LINEAR_SUFFIXES}
        layers.append(
            Layer(
                qkv=Linear.fuse([lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"]]),
                o=lin["self_attn.o_proj"],
                gate_up=Linear.fuse([lin["mlp.gate_proj"], lin["mlp.up_proj"]]),
                down=lin["mlp.down_proj"],
                ln1=state[p + "input_layernorm.weight"].to(device, torch.bfloat16),
                ln2=state[p + "post_attention_layernorm.weight"].to(device, torch.bfloat16),
                k_scale=_kv_scale(state, p + "self_attn.k_scale", cfg.num_kv_heads, kv_dtype, device),
                v_scale=_kv_scale(state, p + "self_attn.v_scale", cfg.num_kv_heads, kv_dtype, device),
            )
        )
    embed = state["model.embed_tokens.weight"].to(device, torch.bfloat16)
    if "lm_head.weight_scale" in state:  # an INT8 head: the GPU's head GEMM runs in BF16, on its dequantized values
        head = dequantize_weight(state["lm_head.weight"].to(device), state["lm_head.weight_scale"].to(device))
        lm_head = head.to(torch.bfloat16)
    elif cfg.tie_word_embeddings or "lm_head.weight" not in state:
        lm_head = embed
    else:
        lm_head = state["lm_head.weight"].to(device, torch.bfloat16)
    norm = state["model.norm.weight"].to(device, torch.bfloat16)
    return GPUDecoder(cfg, embed, layers, norm, lm_head, act, kv_dtype)
