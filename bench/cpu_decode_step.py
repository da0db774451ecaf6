"""Our CPU decode step, its C++ form against its ATen form, side by side: bench/results/cpu_decode_step.{json,md}.

python bench/cpu_decode_step.py [--rounds 9] [--context 400] [--steps 32]
For each CPU scheme on the embedded model: the lean step in ATen ops (``CPUGenerator`` with ``fused`` off: the
decoder's math between our GEMVs) and the fused step (residual add + RMSNorm, RoPE + cache write + attention and
silu * up as C++ calls, each linear as its bare kernel), alternating round by round after a prompt of
``--context`` tokens. Reports median TPOT of each and the median of the per-round ratios (this host is shared
and noisy: only ratios measured back to back mean much).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.common import cpu_info, median, versions, write_results
    from cpu_backend.engine import CPUEngine
    from models.registry import DEFAULT_MODEL

    records = []
    for scheme in ("bf16", "w8a16-int8", "w8a8-int8"):
        engine = CPUEngine(DEFAULT_MODEL, scheme, threads=args.threads)
        gen = engine.generator
        if not gen.fused:
            print(f"{scheme}: this CPU runs no fused step (no AVX-512): nothing to compare")
            continue
        prompt = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))
        gen.prefill(prompt)
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.rounds):
            for fused in (True, False):
                gen.fused = fused
                token = int(prompt[0, -1])
                start = time.perf_counter()
                for i in range(args.steps):
                    token = int(gen.decode(token, args.context + i).argmax())
                times[fused].append((time.perf_counter() - start) * 1000 / args.steps)
        ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
        records.append(
            {
                "scheme": scheme,
                "aten_step_ms": median(times[False]),
                "fused_step_ms": median(times[True]),
                "ratio_per_round": median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
            }
        )
        print(records[-1], flush=True)
        del engine, gen
    meta = {**cpu_info(), **vars(args), "threads": torch.get_num_threads(), "versions": versions("torch")}
    write_results(
        "cpu_decode_step",
        meta,
        records,
        ["scheme", "aten_step_ms", "fused_step_ms", "ratio_per_round", "ratio_min", "ratio_max"],
        [
            f"{DEFAULT_MODEL}, batch 1, greedy, decode at a {args.context}-token context; medians of {args.rounds} "
            f"rounds of {args.steps} tokens, the two steps alternating round by round in one process",
            "aten step: the lean decode loop in ATen ops between our GEMVs (bit-exact with Decoder.forward); "
            "fused step: cpu_backend/csrc/decode.cpp between the GEMVs, linears called as bare kernels",
            "both steps use this build's GEMVs (with their software prefetch)",
        ],
    )


if __name__ == "__main__":
    main()
