"""Where FP8 loses its quality off English: every 8-bit scheme on held-out text in each of the package's languages.

python -m bench.quality_languages [--windows 16] [--threads N]   ->   bench/results/quality_languages.{json,md}
Checkpoints from the shared pipeline (English calibration text, the defaults), evaluated against BF16 with
``quant.evaluate`` (perplexity change, top-1 agreement, KL) on held-out Wikipedia windows in English, Spanish and
French. The weight-only rows separate the weight format's own error from the activations' and the smoothing's.
"""

from __future__ import annotations

import argparse
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    import quant
    from bench.common import cpu_info, versions, write_results
    from cpu_backend.threads import configure_threads
    from models.registry import DEFAULT_MODEL
    from quant.data import LANGUAGES
    from quant.evaluate import EvalConfig, evaluate_checkpoints
    from quant.schemes import W8A8_FP8, W8A8_INT8, W8A16_FP8, W8A16_INT8

    threads = configure_threads(args.threads)
    variants = {
        f"{W8A16_INT8} (RTN)": dict(scheme=W8A16_INT8),
        f"{W8A16_FP8} (RTN)": dict(scheme=W8A16_FP8),
        f"{W8A8_INT8} SmoothQuant auto": dict(scheme=W8A8_INT8),
        f"{W8A8_FP8} alpha 0": dict(scheme=W8A8_FP8, alpha=0.0),
        f"{W8A8_FP8} SmoothQuant auto": dict(scheme=W8A8_FP8),
    }
    folders = {name: quant.build(DEFAULT_MODEL, **options) for name, options in variants.items()}
    records = []
    for language in LANGUAGES:
        result = evaluate_checkpoints(folders, EvalConfig(windows=args.windows, language=language), progress=False)
        for name in variants:
            r = result[name]
            records.append({"language": language, "variant": name, "bf16_ppl": result["reference"]["perplexity"],
                            "ppl": r["perplexity"], "delta_pct": r["delta_pct"], "agreement_pct": 100 * r["agreement"],
                            "kl": r["kl"]})  # fmt: skip
            print(records[-1], flush=True)
    meta = {**cpu_info(), "threads": threads, "windows": args.windows, "model": DEFAULT_MODEL,
            "versions": versions("torch", "transformers"), "torch_threads": torch.get_num_threads()}  # fmt: skip
    write_results(
        "quality_languages",
        meta,
        records,
        ["language", "variant", "bf16_ppl", "ppl", "delta_pct", "agreement_pct", "kl"],
        [
            f"held-out Wikipedia extracts per language ({args.windows} windows x 512 tokens, split by article title, "
            "disjoint from the calibration split); calibration: the English split (the pipeline's default)",
            "RTN: round-to-nearest per output channel, no calibration; alpha auto: the per-layer SmoothQuant search",
        ],
    )


if __name__ == "__main__":
    main()
