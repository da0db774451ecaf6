"""What every CPU benchmark shares: the machine it ran on, medians, and writing results."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def cpu_info() -> dict:
    from cpu_backend.threads import cpu_model_and_flags, physical_cores

    model, flags = cpu_model_and_flags()
    isa = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512_fp16")))
    return {"cpu": model or platform.processor(), "isa": isa, "physical_cores": physical_cores()}


def versions(*packages: str) -> dict:
    out = {"python": sys.version.split()[0]}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def write_results(name: str, meta: dict, records: list[dict], columns: list[str], notes: list[str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "command": " ".join(sys.argv), **meta}
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    lines = [f"# {name}", "", f"- date: {meta['date']}", f"- command: `{meta['command']}`"]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("date", "command")]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    lines += [""] + [f"- {n}" for n in notes]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return "" if v is None else str(v)
