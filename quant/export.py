"""Hand the shared pipeline's calibration to other runtimes (IPEX, OpenVINO).

``export_smoothed`` writes a plain Hugging Face model folder whose weights have our SmoothQuant scales folded
in (an exactly equivalent float model), plus the calibration token ids. A runtime that quantizes this folder
with static per-tensor activation scales on those tokens uses our smoothing and our calibration set, not a
second calibration code path of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.config import DecoderConfig
from models.files import atomic_dir
from models.registry import cache_dir, resolve
from models.weights import read_tensors
from quant.data import calibration_samples
from quant.pipeline import QuantizeConfig, calibrate, quantize_tensors
from quant.schemes import BF16, W8A8_INT8, get_scheme
from quant.stats import model_hash

EXPORT_MANIFEST = "q8chat_export.json"
CALIBRATION_FILE = "calibration.safetensors"  # {"input_ids": int64 [samples, seq_len]}
EXPORT_VERSION = 1


def export_key(qc: QuantizeConfig, source_hash: str) -> str:
    blob = json.dumps({"qc": asdict(qc), "source": source_hash, "version": EXPORT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_export_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def export_smoothed(model_spec: str, alpha: float | str = "auto", out: str | Path | None = None,
                    progress: bool = False, **options: Any) -> Path:
    """A smoothed BF16 model folder + calibration ids for ``model_spec``: reused when already exported.

    Alphas are chosen (``alpha="auto"``) for static per-tensor INT8 activations, the scheme IPEX and
    OpenVINO run. ``options`` are ``QuantizeConfig`` calibration fields (samples, seq_len, data, ...).
    """
    qc = QuantizeConfig(model=model_spec, scheme=W8A8_INT8, alpha=alpha, activations="static", **options)
    scheme = qc.validate()
    folder = resolve(model_spec)
    source_hash = model_hash(folder)
    key = export_key(qc, source_hash)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_spec).name)
    target = Path(out) if out is not None else cache_dir() / "exports" / f"{slug}-smoothed-a{alpha}-{key}"
    manifest = read_export_manifest(target)
    if manifest is not None and manifest.get("key") == key and (target / CALIBRATION_FILE).is_file():
        return target

    cfg = DecoderConfig.from_file(folder / "config.json")
    stats, alphas, info = calibrate(qc, scheme, folder, cfg, progress)
    tensors = quantize_tensors(cfg, read_tensors(folder), get_scheme(BF16), stats, alphas, set())
    from models.chat import load_tokenizer

    ids = calibration_samples(load_tokenizer(folder), qc.samples, qc.seq_len, qc.data)
    with atomic_dir(target) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        save_file({"input_ids": ids.to(torch.int64).contiguous()}, str(tmp / CALIBRATION_FILE))
        hf = json.loads((folder / "config.json").read_text())
        hf.pop("quantization_config", None)
        hf.pop("torch_dtype", None)
        hf["dtype"] = "bfloat16"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", EXPORT_MANIFEST) \
                    and not f.name.startswith("model.safetensors"):
                shutil.copy2(f, tmp / f.name)
        record = {"key": key, "source": {"model": model_spec, "folder": str(folder), "hash": source_hash},
                  "options": {k: v for k, v in asdict(qc).items() if k not in ("model", "scheme")}, **info}
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return target
