"""CPU linear layers: BF16, W8A16 and W8A8, on our C++ GEMVs for decode and oneDNN / ATen for prefill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cpu_backend import kernels

PLAN_BF16, PLAN_W8A16, PLAN_W8A8 = 0, 1, 2  # DecodePlan's linear kinds (csrc/decode.cpp)


class BF16Linear(nn.Module):
    """BF16 linear. One row (decode) on a CPU with AVX512-BF16 runs our GEMV (csrc/gemv.cpp: ``vdpbf16ps``
    over the plain weight, float32 accumulation; oneDNN runs one-row BF16 products on its AMX kernel, far
    from the bandwidth floor). More rows (prefill) run oneDNN on the weight reordered once to its blocked
    layout (~1.2-2.3x faster than on the plain weight at 500 rows, ~1.5-2.5x faster than ``F.linear`` at
    one row): so on such CPUs a layer weight is held twice. ``prefill_copy=False`` (the LM head, which
    prefill calls for one row) keeps the plain copy alone.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 1, prefill_copy: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.gemv = kernels.has_avx512bf16()
        self.register_buffer("weight", w if self.gemv else None, persistent=False)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) if prefill_copy or not self.gemv else None
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Module, prefill_copy: bool = True) -> BF16Linear:
        return cls(linear.weight, getattr(linear, "bias", None), prefill_copy=prefill_copy)

    @classmethod
    def fused(cls, linears: list[nn.Module]) -> BF16Linear:
        """One linear computing ``linears`` side by side (outputs concatenated in order)."""
        biases = [getattr(m, "bias", None) for m in linears]
        bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [b if b is not None else torch.zeros(m.weight.shape[0]) for b, m in zip(biases, linears, strict=True)]
            )
        )
        return cls(torch.cat([m.weight for m in linears]), bias)

    def plan_args(self) -> tuple | None:
        """This linear's one-row kernel for the C++ decode step (``DecodePlan.add_linear``), None without one."""
        if not self.gemv:
            return None
        return (PLAN_BF16, self.weight, None, None, self.bias, 0.0, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)
        if self.gemv and x.numel() == self.in_features:
            return kernels.gemv_bf16(x.reshape(1, -1), self.weight, self.bias).reshape(*x.shape[:-1], -1)
        w = self.packed if self.packed is not None else self.weight
        return torch.ops.mkldnn._linear_pointwise(x, w, self.bias, "none", [], "")


class Int8WeightOnlyLinear(nn.Module):
    """W8A16: per-channel INT8 weights, BF16 activations.

    One row (decode) on an AVX-512 CPU runs our GEMV (csrc/gemv.cpp: the int8 weight widened to float32 in
    registers, exact products, float32 sums, the epilogue below fused); a few rows ``_weight_int8pack_mm`` (K a
    multiple of 16: other K crash it);
    prefill widens the weight to BF16 (exact: int8 values fit) for oneDNN's BF16 GEMM (AMX where the CPU has
    it; 2.7x faster than the float32 GEMM on the embedded model's shapes at 512 rows). All return the unscaled
    product rounded to BF16; the per-channel scale is applied afterwards in float32, because the library
    kernels only take BF16 scales and their rounding (~0.4 %) would move us further off the quantizer's
    reference numerics. So the one difference from the reference is that BF16 rounding of the unscaled
    product (and float32 summation order). One weight copy, plain [N, K] int8, serves every path.
    """

    DECODE_ROWS = 16

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1), persistent=False)
        self.register_buffer("w_scale", self.weight_scale.reshape(-1).contiguous(), persistent=False)
        self.register_buffer("ones", torch.ones(self.out_features, dtype=torch.bfloat16), persistent=False)
        self.register_buffer("one", torch.ones(()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.gemv = kernels.has_avx512()

    def plan_args(self) -> tuple | None:
        """This linear's one-row kernel for the C++ decode step (``DecodePlan.add_linear``), None without one."""
        if not self.gemv:
            return None
        return (PLAN_W8A16, self.weight, None, self.w_scale, self.bias, 0.0, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.shape[0] == 1 and self.gemv:
            y = kernels.gemv_w8a16(x2, self.weight, self.w_scale, self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        if x2.shape[0] <= self.DECODE_ROWS and self.in_features % 16 == 0:  # (it reads out of bounds otherwise)
            y = torch._weight_int8pack_mm(x2, self.weight, self.ones)
        else:
            y = torch.nn.functional.linear(x2, self.weight.to(torch.bfloat16))
        if self.gemv:  # the C++ kernels built: the epilogue in one pass (ATen needs four)
            y = kernels.dequantize(y, self.one, self.w_scale, self.bias)
        else:
            y = y.float() * self.weight_scale.t()
            y = (y if self.bias is None else y + self.bias).to(torch.bfloat16)
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """W8A8 INT8: per-token dynamic (or static per-tensor) INT8 activations x per-channel INT8 weights, with the
    numerics of quant/reference.py: exact int32 products, then (acc * x_scale) * w_scale + bias in float32.

    On a CPU with AVX512-VNNI (and so on AMX Xeons) the weight is held twice, in two layouts:
    - decode (one row): our C++ GEMV (csrc/gemv.cpp) over a VNNI-blocked copy: quantization, int32
      accumulation and dequantization in one call;
    - prefill: oneDNN's u8 x s8 GEMM (AMX or VNNI) on its reordered copy, with unit scales so that it returns
      the exact int32 products as float32 (u8 = q + 128: oneDNN's fast kernels want u8, its zero point is
      applied in int32), then our one-pass dequantization in the reference's order. (oneDNN's own fused
      dequantization rounds differently: one bf16 ulp on ~1e-5 of the outputs.)
    Elsewhere (no VNNI: oneDNN would saturate int16 pairs) prefill runs ``torch._int_mm`` on the plain weight and
    decode oneDNN's u8 x s8 kernel with its fused dequantization.
    """

    PREFILL_ROWS = 512  # oneDNN's reorder hint for the prefill copy

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1, 1), persistent=False)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(()))
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)
        self.register_buffer("w_scale", self.weight_scale.reshape(-1).contiguous(), persistent=False)
        self.static_scale = 0.0 if input_scale is None else float(self.input_scale)
        self.vnni = kernels.has_vnni()
        weight = weight.contiguous()
        if self.vnni:
            vnni_w, comp = kernels.pack_vnni(weight)
            self.register_buffer("vnni_weight", vnni_w, persistent=False)
            self.register_buffer("vnni_comp", comp, persistent=False)
            self.register_buffer("plain", None, persistent=False)
            rows = self.PREFILL_ROWS
            self.register_buffer("ones", torch.ones(self.out_features), persistent=False)
            self.register_buffer("one", torch.ones(()), persistent=False)
        else:
            self.register_buffer("plain", weight, persistent=False)
            rows = 1
        self.register_buffer("packed", torch.ops.onednn.qlinear_prepack(weight, [rows, self.in_features]))
        self.register_buffer("w_zero", torch.zeros(self.out_features, dtype=torch.int64), persistent=False)
        self.register_buffer("x_zero", torch.tensor(128, dtype=torch.int32), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weight [N, K] (rebuilt from the VNNI layout where only that is held)."""
        if self.plain is not None:
            return self.plain
        return kernels.unpack_vnni(self.vnni_weight, self.out_features, self.in_features)

    def _quantize(self, x2: torch.Tensor, zero_point: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_scale is not None:
            return kernels.quantize_per_tensor(x2, self.static_scale, zero_point), self.input_scale
        return kernels.quantize_per_token(x2, zero_point)

    def _onednn(self, q: torch.Tensor, x_scale, w_scale: torch.Tensor, bias, out_dtype: torch.dtype) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise.tensor(
            q, x_scale, self.x_zero, self.packed, w_scale, self.w_zero, bias,
            1.0, 0, out_dtype, "none", [], "",
        )  # fmt: skip

    def plan_args(self) -> tuple | None:
        """This linear's one-row kernel for the C++ decode step (``DecodePlan.add_linear``), None without one."""
        if not self.vnni:
            return None
        return (
            PLAN_W8A8, self.vnni_weight, self.vnni_comp, self.w_scale, self.bias, self.static_scale,
            self.out_features, self.in_features,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 1 and self.vnni:
            y = torch.ops.q8chat.gemv_w8a8(
                x2, self.vnni_weight, self.vnni_comp, self.w_scale, self.bias, self.static_scale, self.out_features
            )
        elif x2.shape[0] == 1:  # no VNNI: oneDNN's u8 x s8 kernel
            q, scale = self._quantize(x2, 128)
            y = self._onednn(q, scale.reshape(()), self.w_scale, self.bias, torch.bfloat16)
        elif self.vnni:  # exact products as float32 (unit scales), then the reference's dequantization
            q, scale = self._quantize(x2, 128)
            acc = self._onednn(q, self.one, self.ones, None, torch.float32)
            y = kernels.dequantize(acc, scale, self.w_scale, self.bias)
        else:
            q, scale = self._quantize(x2, 0)
            y = kernels.dequantize(torch._int_mm(q, self.plain.t()), scale, self.w_scale, self.bias)
        return y.reshape(*shape[:-1], self.out_features)


def fuse_int8(linears: list[nn.Module]) -> nn.Module | None:
    """Stack INT8 linears that read the same input into one (None when they cannot share a kernel)."""
    kinds = {type(m) for m in linears}
    if len(kinds) != 1 or kinds.pop() not in (Int8Linear, Int8WeightOnlyLinear):
        return None
    cls = type(linears[0])
    weight = torch.cat([m.weight for m in linears])
    scale = torch.cat([m.weight_scale for m in linears])
    biases = [m.bias for m in linears]
    bias = (
        None
        if all(b is None for b in biases)
        else torch.cat(
            [b if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, linears, strict=True)]
        )
    )
    if cls is Int8WeightOnlyLinear:
        return cls(weight, scale, bias)
    scales = {None if m.input_scale is None else float(m.input_scale) for m in linears}
    if len(scales) != 1:  # static scales that differ cannot share one activation quantization
        return None
    return cls(weight, scale, linears[0].input_scale, bias)


@dataclass(frozen=True)
class LinearMethod:
    """How the CPU runs one scheme's linears: the module made from a checkpoint linear, and the bytes of memory
    it holds per weight (for the load-time memory check)."""

    create: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], nn.Module]
    bytes_per_weight: int


# keyed by quant.schemes.Scheme.formats (weight type, activation type)
LINEAR_METHODS: dict[tuple[str | None, str | None], LinearMethod] = {
    # the decode GEMV's plain weight + oneDNN's blocked prefill copy, in BF16
    (None, None): LinearMethod(lambda w, ws, xs, b: BF16Linear(w, b), 4),
    ("int", None): LinearMethod(lambda w, ws, xs, b: Int8WeightOnlyLinear(w, ws, b), 1),
    # the GEMV's VNNI layout + oneDNN's prefill copy, in INT8
    ("int", "int"): LinearMethod(lambda w, ws, xs, b: Int8Linear(w, ws, xs, b), 2),
}
