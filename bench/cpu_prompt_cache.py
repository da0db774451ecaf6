"""A chat's later turns with and without the prompt cache: bench/results/cpu_prompt_cache.{json,md}.

python bench/cpu_prompt_cache.py [--turns 8] [--new-tokens 48]
Our CPU engine (BF16 and W8A8) holds a conversation of ``--turns`` turns, as the chat page sends them (the whole
history each turn, greedy answers). Every turn runs twice back to back on the same prompt: warm (the KV cache still
holds the conversation so far: only the new tokens are prefilled) and cold (``cache_prompt=False``: the whole
prompt). Reports prompt length, cached tokens and both TTFTs per turn.
"""

from __future__ import annotations

import argparse
import os

from quant.schemes import BF16, W8A8_INT8

QUESTIONS = [
    "Tell me about the history of the bicycle in a few sentences.",
    "Who invented the pedal-driven version?",
    "How did pneumatic tyres change cycling?",
    "What is the difference between a road bike and a mountain bike?",
    "Why are bicycle frames often made of aluminium?",
    "Give me three tips for riding in the rain.",
    "How should I store a bicycle over the winter?",
    "Summarise what we talked about.",
    "What else should a new cyclist know?",
    "Thank you! One last tip?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.common import cpu_info, versions, write_results
    from cpu_backend.engine import CPUEngine
    from models.backend import SamplingParams
    from models.chat import build_prompt
    from models.registry import DEFAULT_MODEL

    records = []
    for scheme in (BF16, W8A8_INT8):
        engine = CPUEngine(DEFAULT_MODEL, scheme, threads=args.threads)
        warm_up = build_prompt(engine.tokenizer, "Hello").ids
        list(engine.generate_ids(warm_up, SamplingParams(max_new_tokens=4)))
        history: list[dict] = []
        for turn, question in enumerate(QUESTIONS[: args.turns], 1):
            ids = build_prompt(engine.tokenizer, question, history).ids
            runs = {}
            for mode in ("warm", "cold"):
                params = SamplingParams(max_new_tokens=args.new_tokens, cache_prompt=mode == "warm")
                events = list(engine.generate_ids(ids, params))
                runs[mode] = events
            warm, cold = runs["warm"][-1].timings, runs["cold"][-1].timings
            answer = "".join(e.text for e in runs["warm"])
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append(
                {
                    "scheme": scheme,
                    "turn": turn,
                    "prompt_tokens": warm.prompt_tokens,
                    "cached_tokens": warm.cached_tokens,
                    "ttft_warm_ms": warm.ttft_ms,
                    "ttft_cold_ms": cold.ttft_ms,
                    "warm_vs_cold": warm.ttft_ms / cold.ttft_ms,
                }
            )
            print(records[-1], flush=True)
        del engine
    meta = {**cpu_info(), **vars(args), "threads": torch.get_num_threads(), "versions": versions("torch")}
    write_results(
        "cpu_prompt_cache",
        meta,
        records,
        ["scheme", "turn", "prompt_tokens", "cached_tokens", "ttft_warm_ms", "ttft_cold_ms", "warm_vs_cold"],
        [
            f"{DEFAULT_MODEL}, our CPU engine, one conversation of {args.turns} turns (greedy answers of up to "
            f"{args.new_tokens} tokens, the whole history sent each turn as the chat page does)",
            "warm: the KV cache holds the conversation so far (the previous turn's prompt and answer), only the "
            "new tokens are prefilled; cold: the same prompt with cache_prompt=False, prefilled whole; back to back",
            "cached tokens stop short of the previous turn's end where the answer's text tokenizes differently "
            "from the tokens that were sampled",
        ],
    )


if __name__ == "__main__":
    main()
