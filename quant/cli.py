"""python -m quant: quantize a model, evaluate a checkpoint, inspect calibration statistics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quant.schemes import ACTIVATION_MODES, KV_CACHE_OPTIONS, REGISTRY, SCHEMES, W8A8_INT8

EPILOG = "schemes:\n" + "".join(f"  {s.name:<11} {s.summary}\n" for s in REGISTRY.values()) + f"""\
  Schemes with activations smooth first (SmoothQuant): --alpha 0 = naive without smoothing, --alpha auto =
  per-layer search; int8 activations take --activations static for one calibrated per-tensor scale.
  --kv-cache int8|fp8 adds calibrated per-layer k_scale/v_scale. lm_head and embeddings stay BF16.

examples:
  python -m quant quantize --model smollm2-135m --scheme {W8A8_INT8} --alpha auto --out ckpt/sq
  python -m quant eval ckpt/sq --windows 32
  python -m quant stats --model smollm2-135m --samples 16 --top 5
The checkpoint is compressed-tensors (vLLM / transformers load it) plus q8chat_manifest.json (hashes).
Calibration text: the bundled Wikipedia extracts (calibration split; evaluation uses the disjoint held-out
split) or --data FILE.txt/.jsonl. Statistics are cached under $Q8CHAT_CACHE/stats.
"""


def _alpha(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        a = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1] or 'auto', got {value!r}") from None
    if not 0.0 <= a <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be in [0, 1], got {a}")
    return a


def _calibration_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), a HF model folder or a .gguf")
    p.add_argument("--data", default="wiki", help="calibration text: 'wiki' (bundled) or a .txt / .jsonl file")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quant", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate, smooth, quantize and save a checkpoint", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _calibration_args(q)
    q.add_argument("--scheme", choices=SCHEMES, required=True)
    q.add_argument("--alpha", type=_alpha, default=None,
                   help="SmoothQuant alpha in [0, 1] or auto (default auto; 0 = no smoothing; w8a8 schemes only)")
    q.add_argument("--kv-cache", choices=KV_CACHE_OPTIONS, default="none")
    q.add_argument("--activations", choices=ACTIVATION_MODES, default="dynamic",
                   help="int8 activations: per-token dynamic (default) or static per-tensor input_scale")
    q.add_argument("--keep-bf16", nargs="*", default=[], metavar="LINEAR",
                   help="linears left unquantized, e.g. model.layers.0.mlp.down_proj")
    q.add_argument("--search-samples", type=int, default=8, help="alpha=auto: samples used to score the grid")
    q.add_argument("--out", required=True, help="checkpoint folder (replaced if it exists)")
    q.add_argument("--eval", action="store_true", help="evaluate the checkpoint afterwards")
    q.add_argument("--windows", type=int, default=32)
    e = sub.add_parser("eval", help="perplexity / agreement / KL of checkpoints vs the BF16 model")
    e.add_argument("folders", nargs="+", help="checkpoint folders (one pass over the text for all)")
    e.add_argument("--windows", type=int, default=32, help="held-out windows (default 32)")
    e.add_argument("--window", type=int, default=512, help="tokens per window; stride = window (default 512)")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", help="also write the results to this file")
    s = sub.add_parser("stats", help="collect (or show cached) activation statistics")
    _calibration_args(s)
    s.add_argument("--top", type=int, default=5, help="show the N linears with the largest outlier ratio")
    return ap


def _eval(folders: list[str], windows: int, window: int, batch_size: int) -> dict:
    from quant.evaluate import EvalConfig, evaluate_checkpoints

    names = {Path(f).name or str(f): f for f in folders}
    return evaluate_checkpoints(names, EvalConfig(windows, window, batch_size))


def _print_eval(result: dict) -> None:
    ref = result["reference"]
    print(f"BF16 perplexity {ref['perplexity']:.4f} on {ref['tokens']} tokens "
          f"({ref['windows']} windows x {ref['window']}, stride {ref['stride']})")
    for name, r in result.items():
        if name != "reference":
            print(f"{name}: ppl {r['perplexity']:.4f} ({r['delta_pct']:+.2f}%), top-1 agreement "
                  f"{100 * r['agreement']:.2f}%, KL {r['kl']:.5f}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from models.backend import RequestError
    from models.registry import ModelNotFoundError, allow_model_dir, looks_like_path
    from models.weights import CheckpointError
    from quant.data import DataError
    from quant.schemes import SchemeError

    model = getattr(args, "model", None)
    if model and looks_like_path(model):  # a path the operator typed: allowed for this run (see models.registry)
        allow_model_dir(model)
    try:
        if args.command == "quantize":
            from quant.pipeline import QuantizeConfig, quantize

            alpha = args.alpha if args.alpha is not None else "auto"
            qc = QuantizeConfig(model=args.model, scheme=args.scheme, alpha=alpha, kv_cache=args.kv_cache,
                                activations=args.activations, data=args.data, samples=args.samples,
                                seq_len=args.seq_len, search_samples=args.search_samples, batch_size=args.batch_size,
                                keep_bf16=tuple(args.keep_bf16))
            t0 = time.perf_counter()
            out = quantize(qc, args.out)
            print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
            if args.eval:
                _print_eval(_eval([str(out)], args.windows, 512, 2))
        elif args.command == "eval":
            result = _eval(args.folders, args.windows, args.window, args.batch_size)
            _print_eval(result)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        else:
            _stats(args)
    except (SchemeError, DataError, CheckpointError, ModelNotFoundError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _stats(args: argparse.Namespace) -> None:
    import torch

    from models.chat import load_tokenizer
    from models.registry import resolve
    from models.weights import load_decoder
    from quant.data import calibration_samples
    from quant.stats import cached_stats, stats_path

    folder = resolve(args.model)
    samples = calibration_samples(load_tokenizer(folder), args.samples, args.seq_len, args.data)
    stats, hit = cached_stats(load_decoder(folder, torch.bfloat16), folder, samples, args.data, args.batch_size)
    print(f"{'cached' if hit else 'collected'}: {stats_path(stats.meta['key'])}")
    rows = []
    for key, t in stats.tensors.items():
        if key.endswith(".input_absmax"):
            name = key[: -len(".input_absmax")]
            ratio = float(t.max() / t.median().clamp_min(1e-12))
            rows.append((ratio, name, float(t.max()), float(stats.tensors[f"{name}.token_absmax_mean"])))
    rows.sort(reverse=True)
    print("largest channel outliers (max channel abs-max / median channel abs-max):")
    for ratio, name, amax, tok in rows[: args.top]:
        print(f"  {name}: ratio {ratio:.1f}, abs-max {amax:.2f}, mean per-token abs-max {tok:.2f}")
