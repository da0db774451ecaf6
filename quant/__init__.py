"""Calibration + quantization pipeline shared by every backend (``python -m quant --help``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quant.schemes import SCHEMES


def build(model_spec: str, scheme: str, alpha: float | str = "auto", kv_cache: str = "none",
          out: str | Path | None = None, **options: Any) -> Path:
    """Build (or reuse a cached, validated) checkpoint; see ``quant.pipeline.build``."""
    from quant.pipeline import build as _build

    return _build(model_spec, scheme, alpha=alpha, kv_cache=kv_cache, out=out, **options)


__all__ = ["SCHEMES", "build"]
