"""Our CPU decode step, its C++ form against its ATen form, side by side: bench/results/cpu_decode_step.{json,md}.

python bench/cpu_decode_step.py [--rounds 9] [--context 400] [--steps 32]   (other contexts: ..._ctx{N}.{json,md})
For each CPU scheme on the embedded model: the lean step in ATen ops (``CPUGenerator`` with ``fused`` off: the
decoder's math between our GEMVs, float32 KV cache: what CPUs without AVX-512 run) and the engine's step (one C++
call: csrc/decode.cpp's DecodePlan, bf16 KV cache), alternating round by round after a prompt of ``--context``
tokens. Reports median TPOT of each and the median of the per-round ratios (this host is shared and noisy: only
ratios measured back to back mean much).
"""

from __future__ import annotations

import argparse
import os
import time

from quant.schemes import BF16, W8A8_INT8, W8A16_INT8


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
    for scheme in (BF16, W8A16_INT8, W8A8_INT8):
        engine = CPUEngine(DEFAULT_MODEL, scheme, threads=args.threads)
        gen = engine.generator  # the engine's step: C++ ops, bf16 KV cache
        if not gen.cpp_step:
            print(f"{scheme}: this CPU runs no fused step (no AVX-512): nothing to compare")
            continue
        gen32 = CPUGenerator(gen.model, gen.max_len, cache_dtype=torch.float32)
        assert not gen32.cpp_step  # float32 cache: the ATen step
        prompt = torch.randint(100, 40000, (1, args.context), generator=torch.Generator().manual_seed(0))
        gen.prefill(prompt)
        gen32.prefill(prompt)
        variants = {"fused": gen, "aten": gen32}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, g in variants.items():
                token = int(prompt[0, -1])
                start = time.perf_counter()
                for i in range(args.steps):
                    token = int(g.decode(token, args.context + i).argmax())
                times[name].append((time.perf_counter() - start) * 1000 / args.steps)

        records.append(
            {
                "scheme": scheme,
                "aten_step_ms": median(times["aten"]),
                "fused_step_ms": median(times["fused"]),
                "fused_vs_aten": ratio(times["fused"], times["aten"]),
            }
        )
        print(records[-1], flush=True)
        del engine, gen, gen32
    meta = {**cpu_info(), **vars(args), "threads": torch.get_num_threads(), "versions": versions("torch")}
    write_results(
        "cpu_decode_step" if args.context == 400 else f"cpu_decode_step_ctx{args.context}",
        meta,
        records,
        ["scheme", "aten_step_ms", "fused_step_ms", "fused_vs_aten"],
        [
            f"{DEFAULT_MODEL}, batch 1, greedy, decode at a {args.context}-token context; medians of {args.rounds} "
            f"rounds of {args.steps} tokens, the two steps alternating round by round in one process",
            "aten step: the lean decode loop in ATen ops between our GEMVs (bit-exact with Decoder.forward), float32 "
            "KV cache (what CPUs without AVX-512 run); fused step: the engine's, one C++ call per token "
            "(cpu_backend/csrc/decode.cpp DecodePlan: the same GEMVs, the ops between them in C++), bf16 KV cache",
            "ratios: medians of the per-round ratios",
        ],
    )


def ratio(a: list[float], b: list[float]) -> float:
    """Median of the per-round ratios a / b."""
    from bench.common import median

    return median([x / y for x, y in zip(a, b, strict=True)])


if __name__ == "__main__":
    main()
