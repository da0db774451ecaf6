"""SmoothQuant: move activation outliers into the weights with exact per-channel scales.

For a mapping ``prev -> linears`` (``prev``'s output is the linears' input) and input channel j:
``s_j = max|X_j|^alpha / max_l max|W_l[:, j]|^(1 - alpha)``; ``prev``'s output channel j is divided by
``s_j`` and every linear's column j is multiplied by it, so the float model computes the same function.

Mappings of the Llama family (all exact):
  input_layernorm          -> q_proj, k_proj, v_proj
  self_attn.v_proj (rows)  -> o_proj   (one scale per KV-head channel, shared by the query heads of a group)
  post_attention_layernorm -> gate_proj, up_proj
  mlp.up_proj (rows)       -> down_proj

``alpha = "auto"``: for each mapping of each layer, pick from ``ALPHA_GRID`` the alpha whose quantized
linears (kernel numerics of ``quant.reference``) reproduce the float outputs with the lowest relative
squared error on calibration tokens (neural-compressor's auto-alpha idea, measured at each mapping's block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.config import DecoderConfig
from models.decoder import layer_prefix
from quant.reference import QuantLinearRef, quantize_weight
from quant.stats import Stats

ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class Mapping:
    key: str  # name of the mapping in per-layer alpha tables
    prev: str  # suffix inside the layer: a norm or a projection whose output rows are scaled
    linears: tuple[str, ...]


MAPPINGS: tuple[Mapping, ...] = (
    Mapping("qkv", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Mapping("o", "self_attn.v_proj", ("self_attn.o_proj",)),
    Mapping("gate_up", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Mapping("down", "mlp.up_proj", ("mlp.down_proj",)),
)


def _gqa_group(cfg: DecoderConfig) -> int:
    return cfg.num_heads // cfg.num_kv_heads


def smoothing_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1-alpha) per input channel (float32)."""
    w_absmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp_min(MIN_SCALE)
    x = x_absmax.float().clamp_min(MIN_SCALE)
    s = x.pow(alpha) / w_absmax.pow(1 - alpha)
    return s.clamp_min(MIN_SCALE)


def _o_proj_scales(cfg: DecoderConfig, x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple:
    """Scales for v_proj -> o_proj: one per KV channel, expanded to the o_proj input of every query head."""
    g, hd = _gqa_group(cfg), cfg.head_dim
    x_kv = x_absmax.float().view(cfg.num_kv_heads, g, hd).amax(1).flatten()
    w_kv = w.float().abs().amax(0).view(cfg.num_kv_heads, g, hd).amax(1).flatten()
    s_kv = smoothing_scales(x_kv, [w_kv[None, :]], alpha)
    s_o = s_kv.view(cfg.num_kv_heads, 1, hd).expand(cfg.num_kv_heads, g, hd).flatten()
    return s_kv, s_o


def mapping_scales(cfg: DecoderConfig, layer: dict[str, torch.Tensor], m: Mapping, x_absmax: torch.Tensor,
                   alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale for prev's output channels, scale for the linears' input columns)."""
    if m.prev == "self_attn.v_proj":
        return _o_proj_scales(cfg, x_absmax, layer[f"{m.linears[0]}.weight"], alpha)
    s = smoothing_scales(x_absmax, [layer[f"{n}.weight"] for n in m.linears], alpha)
    return s, s


def apply_mapping(layer: dict[str, torch.Tensor], m: Mapping, s_prev: torch.Tensor, s_in: torch.Tensor) -> None:
    """Fold scales into a layer's float32 tensors in place (keys are suffixes such as 'mlp.up_proj.weight')."""
    w = layer[f"{m.prev}.weight"]
    if w.dim() == 1:  # a norm
        layer[f"{m.prev}.weight"] = w / s_prev
    else:  # a projection: scale its output rows (and bias)
        layer[f"{m.prev}.weight"] = w / s_prev[:, None]
        if f"{m.prev}.bias" in layer:
            layer[f"{m.prev}.bias"] = layer[f"{m.prev}.bias"] / s_prev
    for n in m.linears:
        layer[f"{n}.weight"] = layer[f"{n}.weight"] * s_in[None, :]


def smooth_layer(cfg: DecoderConfig, layer_idx: int, layer: dict[str, torch.Tensor], stats: Stats,
                 alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """Smooth one layer's float32 tensors in place.

    Returns each linear's input abs-max after smoothing, plus ``"v_divisor"``: what each value channel
    ([kv_heads * head_dim]) was divided by (the KV cache's v_scale must follow it).
    """
    p = layer_prefix(layer_idx)
    x_absmax = {s: stats.input_absmax(p + s).float() for s in _linear_suffixes()}
    x_absmax["v_divisor"] = torch.ones(cfg.num_kv_heads * cfg.head_dim)
    for m in MAPPINGS:
        alpha = alphas[m.key]
        if alpha <= 0:
            continue  # alpha 0 still divides by max|W|; "naive" means no smoothing at all
        s_prev, s_in = mapping_scales(cfg, layer, m, x_absmax[m.linears[0]], alpha)
        apply_mapping(layer, m, s_prev, s_in)
        for n in m.linears:
            x_absmax[n] = x_absmax[n] / s_in
        if m.prev == "self_attn.v_proj":
            x_absmax["v_divisor"] = s_prev
    return x_absmax


def _linear_suffixes() -> tuple[str, ...]:
    from models.decoder import LINEAR_SUFFIXES

    return LINEAR_SUFFIXES


def mapping_error(cfg: DecoderConfig, layer: dict[str, torch.Tensor], m: Mapping, x: torch.Tensor,
                  x_absmax: torch.Tensor, alpha: float, act: str, static: bool,
                  float_out: dict[str, torch.Tensor] | None = None) -> float:
    """Relative squared error of the mapping's quantized linears vs float, on captured inputs x [tokens, in]."""
    if alpha > 0:
        _, s_in = mapping_scales(cfg, layer, m, x_absmax, alpha)
    else:
        s_in = torch.ones_like(x_absmax)
    xs = x / s_in
    err = 0.0
    for n in m.linears:
        w = layer[f"{n}.weight"]
        y = float_out[n] if float_out is not None else x @ w.t()
        q, ws = quantize_weight(w * s_in[None, :], act)
        input_scale = (x_absmax / s_in).max() / 127.0 if static else None
        yq = QuantLinearRef(q, ws, act, input_scale)(xs)
        err += float((yq - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12))
    return err / len(m.linears)


def search_layer(cfg: DecoderConfig, layer_idx: int, layer: dict[str, torch.Tensor], stats: Stats,
                 inputs: dict[str, torch.Tensor], act: str = "int", static: bool = False,
                 grid: tuple[float, ...] = ALPHA_GRID) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Best alpha per mapping of one layer (float32 tensors; later mappings are searched on the smoothed earlier ones).

    ``inputs`` maps each mapping's first linear suffix to captured float inputs [tokens, in].
    Returns (alphas, errors per grid point).
    """
    p = layer_prefix(layer_idx)
    layer = dict(layer)  # smoothing below replaces entries; the caller's tensors stay as they were
    alphas, errors = {}, {}
    for m in MAPPINGS:
        x_absmax = stats.input_absmax(p + m.linears[0]).float()
        x = inputs[m.linears[0]].float()
        ys = {n: x @ layer[f"{n}.weight"].t() for n in m.linears}
        errs = [mapping_error(cfg, layer, m, x, x_absmax, a, act, static, ys) for a in grid]
        best = grid[min(range(len(grid)), key=errs.__getitem__)]
        alphas[m.key], errors[m.key] = best, errs
        if best > 0:
            s_prev, s_in = mapping_scales(cfg, layer, m, x_absmax, best)
            apply_mapping(layer, m, s_prev, s_in)
    return alphas, errors
