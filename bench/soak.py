"""Soak: one long conversation in one process through ChatService on the CPU backend.

N turns (default 200), each a new question on top of the whole history so far (greedy, a few dozen new
tokens), with a context small enough that the history outgrows it early. Measures the process's resident
memory after every turn and checks that, after a warm-up, it stays flat (growth < 5%) and that history
truncation keeps working: once the history exceeds the context, every turn drops its oldest turns
(``dropped_turns > 0``), still keeps some history, and the prompt always fits the context minus the
answer's room.

    python bench/soak.py [--turns 200] [--warmup 10] [--max-context 512] [--max-new-tokens 32] [--threads N]
                         [--kernel-cache 32 (0: oneDNN's default, 1024 kernels per shape)] [--name soak]

Writes bench/results/soak.{json,md} (machine, versions, settings, a row every --every turns, the summary).
tests/test_soak.py runs a bounded version (30 turns).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import psutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cpu_backend.runtime import CACHE_VARIABLES, KERNEL_CACHE_CAPACITY, bound_kernel_caches
from models.backend import SamplingParams
from models.registry import DEFAULT_MODEL
from quant.schemes import BF16
from serving.service import ChatService, ChatSettings

MIB = 1 << 20
MAX_GROWTH_PCT = 5.0
QUESTIONS = [
    "What is the capital of France?",
    "Tell me one fact about elephants.",
    "How many days are in a leap year?",
    "What is the boiling point of water in Celsius?",
    "Name a famous painting by Leonardo da Vinci.",
    "What gas do plants take in from the air?",
    "Give me a synonym for happy.",
    "Which ocean is the largest?",
    "What is 15 times 4?",
    "Who was the first person to walk on the Moon?",
    "What language is spoken in Brazil?",
    "Suggest a name for a pet goldfish.",
    "What is the tallest mountain on Earth?",
    "How do you say thank you in Japanese?",
    "What is the chemical symbol for gold?",
    "Recommend a book for a long train ride.",
    "Why is the sky blue? Answer briefly.",
    "What did we talk about first?",
]


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def make_service(max_context: int, threads: int | None, kernel_cache: int = KERNEL_CACHE_CAPACITY) -> ChatService:
    """A ChatService whose CPU engine has a short context, so the history outgrows it within a few turns."""
    from cpu_backend.engine import CPUEngine

    if kernel_cache:  # what ChatService.engine() does before building an engine (0: the libraries' default)
        bound_kernel_caches(kernel_cache)
    service = ChatService()
    engine = CPUEngine(DEFAULT_MODEL, BF16, threads=threads, max_context=max_context)
    # ChatService.engine() builds engines with the default context; put the short-context one in its place.
    service._engines["cpu"], service._keys["cpu"] = engine, (DEFAULT_MODEL, BF16)
    return service


def run_soak(
    turns: int = 200,
    warmup: int = 10,
    max_context: int = 512,
    max_new_tokens: int = 32,
    threads: int | None = None,
    progress: bool = True,
    kernel_cache: int = KERNEL_CACHE_CAPACITY,
) -> dict:
    """Run the conversation; return per-turn records and the summary (growth, truncation checks)."""
    if not 1 <= warmup < turns:
        raise ValueError(f"warm-up ({warmup}) must be at least 1 and below the number of turns ({turns})")
    service = make_service(max_context, threads, kernel_cache)
    settings = ChatSettings("cpu", DEFAULT_MODEL, BF16, "", SamplingParams(max_new_tokens=max_new_tokens))
    budget = service.engine("cpu", DEFAULT_MODEL, BF16).context_length - max_new_tokens
    history: list[dict[str, str]] = []
    records = []
    start = time.perf_counter()
    for turn in range(1, turns + 1):
        question = QUESTIONS[(turn - 1) % len(QUESTIONS)]
        t0 = time.perf_counter()
        updates = list(service.chat(question, history, settings))
        update = updates[-1]
        assert update.done and update.timings is not None
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": update.text}]
        t = update.timings
        records.append(
            {
                "turn": turn,
                "history_turns": turn - 1,
                "prompt_tokens": t.prompt_tokens,
                "dropped_turns": update.dropped_turns,
                "generated_tokens": t.generated_tokens,
                "ttft_ms": round(t.ttft_ms, 1),
                "tpot_ms": round(t.tpot_ms, 2),
                "turn_s": round(time.perf_counter() - t0, 3),
                "rss_mib": round(rss_bytes() / MIB, 2),
            }
        )
        if progress and (turn % 10 == 0 or turn == 1):
            r = records[-1]
            print(
                f"turn {turn:4d}: prompt {r['prompt_tokens']:4d} tokens, {r['dropped_turns']:3d} turns dropped, "
                f"RSS {r['rss_mib']:.1f} MiB, {r['turn_s']:.2f} s",
                flush=True,
            )
    return {"records": records, "summary": summarize(records, warmup, budget), "wall_s": time.perf_counter() - start}


def summarize(records: list[dict], warmup: int, budget: int) -> dict:
    warm = records[warmup - 1]["rss_mib"]
    after = [r["rss_mib"] for r in records[warmup:]]
    end = records[-1]["rss_mib"]
    first_drop = next((r["turn"] for r in records if r["dropped_turns"] > 0), None)
    later = [r for r in records if first_drop is not None and r["turn"] >= first_drop]
    truncation_ok = (
        first_drop is not None
        and all(r["dropped_turns"] > 0 for r in later)  # every turn past the context drops old turns ...
        and all(r["dropped_turns"] < r["history_turns"] for r in later)  # ... but keeps recent ones
        and all(r["prompt_tokens"] <= budget for r in records)  # and the prompt always fits
        and records[-1]["dropped_turns"] > records[first_drop - 1]["dropped_turns"]  # it keeps dropping more
    )
    growth = 100.0 * (end - warm) / warm
    peak_growth = 100.0 * (max(after) - warm) / warm
    return {
        "turns": len(records),
        "warmup_turns": warmup,
        "rss_warm_mib": warm,
        "rss_end_mib": end,
        "rss_max_after_warmup_mib": max(after),
        "rss_growth_pct": round(growth, 3),
        "rss_peak_growth_pct": round(peak_growth, 3),
        "rss_ok": peak_growth < MAX_GROWTH_PCT,
        "first_truncated_turn": first_drop,
        "final_dropped_turns": records[-1]["dropped_turns"],
        "max_prompt_tokens": max(r["prompt_tokens"] for r in records),
        "prompt_budget": budget,
        "truncation_ok": truncation_ok,
        "max_rss_kib_getrusage": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--kernel-cache",
        type=int,
        default=KERNEL_CACHE_CAPACITY,
        help="oneDNN/ideep per-shape kernel cache capacity, as the service sets it; 0 = the libraries' default (1024)",
    )
    p.add_argument("--every", type=int, default=10, help="a table row every N turns")
    p.add_argument("--name", default="soak", help="results file name under bench/results")
    args = p.parse_args(argv)

    from bench.common import RESULTS, cpu_info, versions, write_results
    from cpu_backend.threads import configure_threads

    threads = configure_threads(args.threads)
    result = run_soak(args.turns, args.warmup, args.max_context, args.max_new_tokens, threads, True, args.kernel_cache)
    s = result["summary"]
    rows = [r for r in result["records"] if r["turn"] == 1 or r["turn"] % args.every == 0 or r["turn"] == args.warmup]
    meta = {
        **cpu_info(),
        "threads": threads,
        "versions": versions("torch", "transformers"),
        "model": DEFAULT_MODEL,
        "scheme": BF16,
        "settings": {k: getattr(args, k) for k in ("turns", "warmup", "max_context", "max_new_tokens", "kernel_cache")},
        "kernel_cache_env": {name: os.environ.get(name) for name in CACHE_VARIABLES},
        "wall_s": round(result["wall_s"], 1),
        "summary": s,
    }
    notes = [
        f"RSS after the {s['warmup_turns']}-turn warm-up {s['rss_warm_mib']:.1f} MiB, at the end "
        f"{s['rss_end_mib']:.1f} MiB: growth {s['rss_growth_pct']:+.2f}% (peak after warm-up "
        f"{s['rss_peak_growth_pct']:+.2f}%; limit {MAX_GROWTH_PCT}%): {'ok' if s['rss_ok'] else 'FAILED'}",
        f"truncation: first at turn {s['first_truncated_turn']}, {s['final_dropped_turns']} turns dropped at the "
        f"end, prompts at most {s['max_prompt_tokens']} of {s['prompt_budget']} tokens: "
        f"{'ok' if s['truncation_ok'] else 'FAILED'}",
        f"{s['turns']} turns in {result['wall_s']:.0f} s",
    ]
    columns = ["turn", "history_turns", "prompt_tokens", "dropped_turns", "generated_tokens", "ttft_ms", "tpot_ms",
               "turn_s", "rss_mib"]  # fmt: skip
    write_results(args.name, meta, rows, columns, notes)
    path = RESULTS / f"{args.name}.json"  # the JSON keeps every turn, the markdown table a row every --every
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "all_turns": result["records"]}, indent=1) + "\n")
    return 0 if s["rss_ok"] and s["truncation_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
