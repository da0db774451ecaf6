"""One llama.cpp measurement round, run in its own virtualenv (see bench/cpu_latency.py --llama-python).

Prints one JSON line: {"ttft_ms_128", "ttft_ms_512", "tpot_ms"} for the given GGUF, greedy, batch 1.
With --quantize-q8 IN OUT it only requantizes a GGUF to Q8_0 and exits.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time


def quantize_q8(src: str, dst: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {src}")


def timed_generate(llm, tokens: list[int], n_new: int) -> list[float]:
    """Timestamps (s) of each generated token, relative to the call."""
    start = time.perf_counter()
    stamps = []
    for _ in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter() - start)
        if len(stamps) == n_new:
            break
    return stamps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", help="JSON file: {'p128': [...], 'p512': [...]}")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--quantize-q8", nargs=2, metavar=("IN", "OUT"))
    args = ap.parse_args()
    if args.quantize_q8:
        quantize_q8(*args.quantize_q8)
        return
    from llama_cpp import Llama

    prompts = json.load(open(args.prompt))
    llm = Llama(
        model_path=args.gguf,
        n_ctx=1024,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=args.n_batch,
        verbose=True,
    )
    timed_generate(llm, prompts["p128"][:16], 4)  # warm-up
    s = timed_generate(llm, prompts["p128"], args.new_tokens)
    s512 = timed_generate(llm, prompts["p512"], 1)
    print(
        json.dumps(
            {"ttft_ms_128": s[0] * 1000, "ttft_ms_512": s512[0] * 1000, "tpot_ms": (s[-1] - s[0]) * 1000 / (len(s) - 1)}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
