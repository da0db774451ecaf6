"""Reference numerics of the quantized kernels, in plain PyTorch (float math, exact int8 accumulation).

Backends test their kernels against these functions; evaluation runs the model through them.

Activations (per token, dynamic), computed in float32 from the layer input:
  int8: ``scale = max(amax(|x|), AMAX_EPS) / 127``; ``q = clamp(round_half_even(x / scale), -127, 127)``
  fp8:  ``scale = max(amax(|x|), AMAX_EPS) / 448``; ``q = float8_e4m3fn(clamp(x / scale, -448, 448))``
  static int8 (per tensor): ``scale = input_scale`` from the checkpoint, then as above.
Weights are stored quantized with a float32 scale per output channel (``weight_scale`` [out, 1]).
Output: ``y = (acc * x_scale[:, None]) * w_scale[None, :]`` with ``acc`` the int32 (int8) or float32
(fp8, exact products) dot product, plus bias, cast back to the input dtype.
Weight-only int8: ``y = (x.float() @ q_w.float().T) * w_scale``.
KV cache: a per-tensor scale per layer; int8 ``round(k / k_scale)`` clamped, fp8 ``e4m3(k / k_scale)``.
"""

from __future__ import annotations

import torch
from torch import nn

from quant.schemes import FP8_MAX, INT8_MAX

AMAX_EPS = 1e-6
FP8 = torch.float8_e4m3fn


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales [..., 1] of a float tensor, one scale per row (token)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(AMAX_EPS) / INT8_MAX
    return torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_per_tensor_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True).clamp_min(AMAX_EPS) / FP8_MAX
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_weight(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric quantization of a [out, in] weight: (q, float32 scale [out, 1])."""
    w = w.float()
    qmax = FP8_MAX if kind == "float" else INT8_MAX
    scale = w.abs().amax(1, keepdim=True).clamp_min(AMAX_EPS) / qmax
    if kind == "float":
        return (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale
    return torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a[M, K] @ b[N, K]^T."""
    if a.device.type == "cpu" or a.shape[0] > 16:
        return torch._int_mm(a, b.t())
    return (a.double() @ b.double().t()).to(torch.int32)  # CUDA _int_mm wants M > 16; exact in float64


class QuantLinearRef(nn.Module):
    """A linear layer that computes exactly what the quantized kernels compute, in float/int32 math.

    ``act`` is "int" (per-token or static int8), "float" (per-token fp8) or None (weight-only).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        act: str | None,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if weight.dim() != 2 or tuple(weight_scale.shape) != (weight.shape[0], 1):
            raise ValueError(
                f"weight {tuple(weight.shape)} needs weight_scale [out, 1], got {tuple(weight_scale.shape)}"
            )
        if act == "float" and weight.dtype != FP8 or act == "int" and weight.dtype != torch.int8:
            raise ValueError(f"activation type {act!r} does not match weight dtype {weight.dtype}")
        self.act = act
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        w_scale = self.weight_scale.reshape(1, -1)
        if self.act is None:
            y = (x2.float() @ self.weight.float().t()) * w_scale
        elif self.act == "int":
            if self.input_scale is not None:
                q, x_scale = quantize_per_tensor_int8(x2, self.input_scale), self.input_scale.reshape(1, 1)
            else:
                q, x_scale = quantize_per_token_int8(x2)
            y = (int8_matmul(q, self.weight).float() * x_scale) * w_scale
        else:
            q, x_scale = quantize_per_token_fp8(x2)
            y = ((q.float() @ self.weight.float().t()) * x_scale) * w_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        static = "static" if self.input_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, w={self.weight.dtype}, act={self.act} ({static})"


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """What a quantized KV cache gives back: quantize with a per-tensor scale, dequantize to x's dtype."""
    s = scale.float()
    if kind == "int8":
        q = torch.round(x.float() / s).clamp_(-INT8_MAX, INT8_MAX)
    else:
        q = (x.float() / s).clamp_(-FP8_MAX, FP8_MAX).to(FP8).float()
    return (q * s).to(x.dtype)


def _kv_cache_class():
    from models.decoder import KVCache

    class FakeQuantKVCache(KVCache):
        """The decoder's KV cache, storing what a quantized cache would give back (per-layer scales)."""

        def __init__(self, cfg, batch, max_len, dtype, device, k_scales, v_scales, kind) -> None:
            super().__init__(cfg, batch, max_len, dtype, device)
            self.k_scales, self.v_scales, self.kind = k_scales, v_scales, kind

        def update(self, layer, start, k, v):
            k = fake_quant_kv(k, self.k_scales[layer], self.kind)
            v = fake_quant_kv(v, self.v_scales[layer], self.kind)
            return super().update(layer, start, k, v)

    return FakeQuantKVCache


def reference_decoder(ckpt, dtype: torch.dtype = torch.bfloat16, device: str = "cpu"):
    """A ``models.decoder.Decoder`` running a loaded checkpoint (``QuantizedCheckpoint``) with reference numerics.

    Quantized projections become ``QuantLinearRef``; with a quantized KV cache, ``new_cache`` returns a
    cache that fake-quantizes keys and values with the checkpoint's ``k_scale``/``v_scale``.
    """
    from models.decoder import Decoder
    from models.weights import decoder_from_tensors

    cfg = ckpt.config
    with torch.device("meta"):
        linear_names = {n for n in Decoder(cfg).linear_names() if ckpt.is_quantized(n)}  # kept-BF16: nn.Linear
    model = decoder_from_tensors(cfg, ckpt.tensors, dtype, device, skip=linear_names, where=str(ckpt.folder))
    act = ckpt.scheme.activation_type
    for name in sorted(linear_names):
        w, ws, xs = ckpt.linear(name)
        bias = ckpt.tensors.get(f"{name}.bias")
        module = QuantLinearRef(
            w.to(device), ws.to(device), act, None if xs is None else xs.to(device),
            None if bias is None else bias.to(device=device, dtype=dtype),
        )
        model.replace_linear(name, module)
    if ckpt.scheme.kv_cache != "none":
        ks, vs = ckpt.kv_scales()
        cache_cls, kind = _kv_cache_class(), ckpt.scheme.kv_cache

        def new_cache(batch: int, max_len: int, dtype_: torch.dtype | None = None):
            max_len = min(max_len, cfg.max_position_embeddings)
            return cache_cls(cfg, batch, max_len, dtype_ or dtype, device, ks, vs, kind)

        model.new_cache = new_cache
    return model.eval()
