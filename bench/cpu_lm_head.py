"""The INT8 LM head on the CPU, speed and quality in one run: bench/results/cpu_lm_head.{json,md}.

python -m bench.cpu_lm_head [--rounds 9] [--context 400] [--steps 32] [--windows 16]
Three engines on the embedded model: BF16, W8A8-INT8 with the BF16 head the quantizer keeps by default, and
W8A8-INT8 with ``--int8-lm-head`` (INT8 weights per output channel, the W8A16 GEMV). Decode steps (the engine's
C++ step) alternate round by round after a ``--context``-token prompt; reported: median TPOT and the medians of
the per-round ratios. Then perplexity, top-1 agreement and KL of both W8A8 checkpoints against BF16 on the
held-out Wikipedia windows (``quant.evaluate``, the quality table's method).
"""

from __future__ import annotations

import argparse
import os
import time

from quant.schemes import BF16, W8A8_INT8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--context", type=int, default=400)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import quant
    from bench.common import cpu_info, median, versions, write_results
    from cpu_backend.engine import CPUEngine
    from models.registry import DEFAULT_MODEL
    from quant.evaluate import EvalConfig, evaluate_checkpoints

    folders = {"w8a8 bf16 head": quant.build(DEFAULT_MODEL, W8A8_INT8),
               "w8a8 int8 head": quant.build(DEFAULT_MODEL, W8A8_INT8, int8_lm_head=True)}  # fmt: skip
    engines = {"bf16": CPUEngine(DEFAULT_MODEL, BF16, threads=args.threads)}
    for name, folder in folders.items():
        engines[name] = CPUEngine(DEFAULT_MODEL, W8A8_INT8, threads=args.threads, checkpoint=folder)
    prompt = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))
    for e in engines.values():
        e.generator.prefill(prompt)
    times: dict[str, list[float]] = {name: [] for name in engines}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, e in engines.items():
                token = int(prompt[0, -1])
                start = time.perf_counter()
                for i in range(args.steps):
                    token = int(e.generator.decode(token, args.context + i).argmax())
                times[name].append((time.perf_counter() - start) * 1000 / args.steps)
    del engines

    def per_round(a: str, b: str) -> float:
        return median([x / y for x, y in zip(times[a], times[b], strict=True)])

    quality = evaluate_checkpoints(folders, EvalConfig(windows=args.windows), progress=False)
    records = []
    for name in times:
        q = quality.get(name, {})
        records.append(
            {
                "engine": name,
                "tpot_ms": median(times[name]),
                "vs_bf16": per_round(name, "bf16"),
                "vs_w8a8_bf16_head": per_round(name, "w8a8 bf16 head"),
                "ppl_delta_pct": q.get("delta_pct"),
                "top1_agreement_pct": 100 * q["agreement"] if q else None,
            }
        )
        print(records[-1], flush=True)
    meta = {**cpu_info(), **vars(args), "threads": torch.get_num_threads(), "versions": versions("torch")}
    write_results(
        "cpu_lm_head",
        meta,
        records,
        ["engine", "tpot_ms", "vs_bf16", "vs_w8a8_bf16_head", "ppl_delta_pct", "top1_agreement_pct"],
        [
            f"{DEFAULT_MODEL}, batch 1, greedy, the engine's C++ decode step at a {args.context}-token context; "
            f"medians of {args.rounds} rounds of {args.steps} tokens, the engines alternating round by round",
            "ratios: medians of the per-round ratios; quality: perplexity change, top-1 agreement vs BF16 on "
            f"{args.windows} held-out Wikipedia windows of 512 tokens (quant.evaluate)",
        ],
    )


if __name__ == "__main__":
    main()
