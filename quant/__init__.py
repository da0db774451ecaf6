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


def buildable_schemes(model_spec: str) -> tuple[str, ...]:
    """Schemes whose checkpoint can be built for ``model_spec`` (all of them for any model q8chat runs).

    Building needs no GPU: every scheme is quantized and evaluated on the CPU. Raises the registry's or the
    config's error (a ValueError with a message) when the model itself cannot be used.
    """
    from models.config import DecoderConfig
    from models.registry import resolve

    DecoderConfig.from_file(resolve(model_spec) / "config.json")
    return SCHEMES


__all__ = ["SCHEMES", "build", "buildable_schemes"]
