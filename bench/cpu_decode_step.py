"""Our CPU decode step, its C++ form against its ATen form, side by side: bench/results/cpu_decode_step.{json,md}.

python bench/cpu_decode_step.py [--rounds 9] [--context 400] [--steps 32]   (other contexts: ..._ctx{N}.{json,md})
For each CPU scheme on the embedded model: the lean step in ATen ops (``CPUGenerator`` with ``fused`` off: the
decoder's math between our GEMVs, float32 KV cache) and the fused step (residual add + RMSNorm, RoPE + cache
write + attention and silu * up as C++ calls, each linear as its bare kernel) over a bf16 (the engine's) or a
float32 KV cache, alternating round by round after a prompt of ``--context`` tokens. Reports median TPOT of each
and medians of the per-round ratios (this host is shared and noisy: only ratios measured back to back mean much).
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
    from cpu_backend.engine import CPUEngine, CPUGenerator
    from models.registry import DEFAULT_MODEL

    records = []
    for scheme in ("bf16", "w8a16-int8", "w8a8-int8"):
        engine = CPUEngine(DEFAULT_MODEL, scheme, threads=args.threads)
        gen = engine.generator  # the engine's step: C++ ops, bf16 KV cache
        if not gen.fused:
            print(f"{scheme}: this CPU runs no fused step (no AVX-512): nothing to compare")
            continue
        gen32 = CPUGenerator(gen.model, gen.tokenizer, gen.eos_ids, gen.max_len, cache_dtype=torch.float32)
        prompt = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))
        gen.prefill(prompt)
        gen32.prefill(prompt)
        variants = {"fused": (gen, True), "fused_fp32_cache": (gen32, True), "aten": (gen32, False)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, (g, fused) in variants.items():
                g.fused = fused
                token = int(prompt[0, -1])
                start = time.perf_counter()
                for i in range(args.steps):
                    token = int(g.decode(token, args.context + i).argmax())
                times[name].append((time.perf_counter() - start) * 1000 / args.steps)

        records.append(
            {
                "scheme": scheme,
                "aten_step_ms": median(times["aten"]),
                "fused_fp32_cache_ms": median(times["fused_fp32_cache"]),
                "fused_step_ms": median(times["fused"]),
                "fused_vs_aten": ratio(times["fused"], times["aten"]),
                "bf16_vs_fp32_cache": ratio(times["fused"], times["fused_fp32_cache"]),
            }
        )
        print(records[-1], flush=True)
        del engine, gen, gen32
    meta = {**cpu_info(), **vars(args), "threads": torch.get_num_threads(), "versions": versions("torch")}
    write_results(
        "cpu_decode_step" if args.context == 400 else f"cpu_decode_step_ctx{args.context}",
        meta,
        records,
        ["scheme", "aten_step_ms", "fused_fp32_cache_ms", "fused_step_ms", "fused_vs_aten", "bf16_vs_fp32_cache"],
        [
            f"{DEFAULT_MODEL}, batch 1, greedy, decode at a {args.context}-token context; medians of {args.rounds} "
            f"rounds of {args.steps} tokens, the three variants alternating round by round in one process",
            "aten step: the lean decode loop in ATen ops between our GEMVs (bit-exact with Decoder.forward), float32 "
            "KV cache (what CPUs without AVX-512 run); fused step: cpu_backend/csrc/decode.cpp between the GEMVs, "
            "linears called as bare kernels, bf16 KV cache (the engine's default), or float32 cache",
            "ratios: medians of the per-round ratios",
            "both steps use this build's GEMVs (with their software prefetch)",
        ],
    )


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a / b."""
    from bench.common import median

    return median([x / y for x, y in zip(a, b, strict=True)])


if __name__ == "__main__":
    main()
