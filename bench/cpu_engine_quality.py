"""The CPU engine's own numerics on the quality evaluation: bench/results/cpu_engine_quality.{json,md}.

python bench/cpu_engine_quality.py [--windows 16] [--threads 2]
For each CPU 8-bit scheme, perplexity / top-1 agreement / KL against the BF16 model, of the scheme's reference
numerics (quant.reference, what bench/quality.py reports) and of the engine that serves it (cpu_backend: our
C++ GEMVs, oneDNN prefill), on the same held-out windows: what the kernels add to the scheme's own error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from quant.schemes import W8A8_INT8, W8A16_INT8

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import quant
    from bench.quality import cpu_name
    from cpu_backend.engine import load_quantized
    from cpu_backend.threads import configure_threads
    from models.chat import load_tokenizer
    from models.registry import DEFAULT_MODEL, resolve
    from models.weights import load_decoder
    from quant.checkpoint import load_checkpoint
    from quant.data import eval_windows
    from quant.evaluate import compare
    from quant.reference import reference_decoder

    threads = configure_threads(args.threads)
    src = resolve(DEFAULT_MODEL)
    tokens = eval_windows(load_tokenizer(src), args.windows, args.window)
    bf16 = load_decoder(src, torch.bfloat16)
    res = {
        "cpu": cpu_name(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": DEFAULT_MODEL,
        "windows": args.windows,
        "window": args.window,
        "schemes": {},
    }
    for scheme in (W8A16_INT8, W8A8_INT8):
        t0 = time.time()
        folder = quant.build(DEFAULT_MODEL, scheme)
        candidates = {
            "reference numerics": reference_decoder(load_checkpoint(folder), torch.bfloat16),
            "CPU engine": load_quantized(folder, scheme),
        }
        res["schemes"][scheme] = compare(bf16, candidates, tokens, 2, progress=False)
        print(f"{scheme}: {json.dumps(res['schemes'][scheme])} ({time.time() - t0:.0f} s)", flush=True)
    out = Path(args.out)
    (out / "cpu_engine_quality.json").write_text(json.dumps(res, indent=1))
    lines = [
        "# CPU engine numerics on the quality evaluation",
        "",
        f"{res['cpu']}, {threads} threads, torch {res['torch']}; {DEFAULT_MODEL}, {args.windows} held-out windows of "
        f"{args.window} tokens; command `python bench/cpu_engine_quality.py`. Deltas and agreement are against the "
        "BF16 model.",
        "",
        "| scheme | numerics | perplexity | delta | top-1 agreement | KL |",
        "|---|---|---|---|---|---|",
        f"| bf16 | the model | {next(iter(res['schemes'].values()))['reference']['perplexity']:.3f} | | | |",
    ]
    for scheme, r in res["schemes"].items():
        for name in ("reference numerics", "CPU engine"):
            c = r[name]
            lines.append(
                f"| {scheme} | {name} | {c['perplexity']:.3f} | {c['delta_pct']:+.2f}% | {100 * c['agreement']:.1f}% "
                f"| {c['kl']:.4f} |"
            )
    (out / "cpu_engine_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
