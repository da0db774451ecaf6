"""GPU measurements recorded by the benchmarks (bench/results), shown beside Compare's live columns so a CPU-only
machine still answers "how fast on a GPU?". Always labelled as recorded, with the device that measured them."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
log = logging.getLogger("q8chat")


@dataclass(frozen=True)
class Recorded:
    device: str  # "NVIDIA H200"
    model: str  # what ran: the embedded model (real weights) or a shape with random weights
    scheme: str
    tpot_ms: float
    ttft_ms: float | None  # None where the run did not time a first token
    source: str  # the result file, relative to the repository

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.tpot_ms

    @property
    def label(self) -> str:
        return f"GPU {self.scheme} (recorded {self.device.removeprefix('NVIDIA ')})"


def _load(name: str) -> dict | None:
    try:
        return json.loads((RESULTS / name).read_text())
    except (OSError, ValueError) as e:
        log.info("no recorded GPU results in %s (%s)", name, e)
        return None


@functools.cache
def embedded() -> tuple[Recorded, ...]:
    """The embedded model on a GPU, per scheme (bench/results/gpu_embedded.json): the same model the page runs."""
    data = _load("gpu_embedded.json")
    if not data:
        return ()
    return tuple(
        Recorded(
            data.get("device", "GPU"),
            "SmolLM2-135M",
            scheme,
            float(row["gpu_tpot_ms"]),
            None,
            "bench/results/gpu_embedded.json",
        )
        for scheme, row in data.get("schemes", {}).items()
        if row.get("gpu_tpot_ms")
    )


@functools.cache
def large() -> tuple[Recorded, ...]:
    """A Llama-3-8B-shaped model (random weights) at batch 1, per scheme (bench/results/gpu_latency*.json)."""
    rows = []
    for path in sorted(RESULTS.glob("gpu_latency*.json")):
        data = _load(path.name) or {}
        for model, entry in data.get("models", {}).items():
            for row in entry.get("rows", []):
                b1 = row.get("decode", {}).get("1", {})
                if b1.get("tpot_ms"):
                    rows.append(
                        Recorded(
                            data.get("device", "GPU"),
                            model,
                            row["scheme"],
                            float(b1["tpot_ms"]),
                            row.get("ttft_ms"),
                            f"bench/results/{path.name}",
                        )
                    )
    return tuple(rows)


def markdown(model_is_embedded: bool) -> str:
    """The recorded column's text."""
    small, big = embedded(), large()
    if not small and not big:
        return "*No recorded GPU measurements in bench/results.*"
    lines = ["**Recorded, not live:** q8chat's GPU engine, batch 1.", ""]
    if small:
        lines += [f"**{small[0].device}**, {small[0].model} (this page's model), tokens/s:", ""]
        lines += [f"- {r.scheme}: **{r.tokens_per_s:.0f}** ({r.tpot_ms:.2f} ms/token)" for r in small]
    if big:
        lines += ["", f"**{big[0].device}**, {big[0].model} (random weights), tokens/s · TTFT at 1,024 tokens:", ""]
        for r in big:
            ttft = f" · {r.ttft_ms:.0f} ms" if r.ttft_ms else ""
            lines.append(f"- {r.scheme}: {r.tokens_per_s:.0f}{ttft}")
    sources = sorted({r.source for r in small + big})
    lines += ["", "From " + ", ".join(f"`{s}`" for s in sources) + "."]
    if not model_is_embedded:
        lines += ["", "*These are for the models named above, not the model picked here.*"]
    return "\n".join(lines)
