"""CPU linear layers with weights prepacked once for oneDNN."""

from __future__ import annotations

import torch
from torch import nn


class PackedBF16Linear(nn.Module):
    """BF16 linear on oneDNN with the weight reordered to its blocked layout at load.

    At batch 1 this is ~1.5-2.5x faster than ``F.linear`` (which re-reads a plain layout through
    a generic GEMM); it is what Inductor's freezing pass emits for BF16 linears.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        w = weight.detach().to(torch.bfloat16).contiguous()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(w, batch_hint), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> PackedBF16Linear:
        return cls(linear.weight, getattr(linear, "bias", None))

    @classmethod
    def fused(cls, linears: list[nn.Module]) -> PackedBF16Linear:
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.packed, self.bias, "none", [], "")
