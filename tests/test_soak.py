"""Long sessions: a bounded run of bench/soak.py (30 turns, a 256-token context so truncation starts early).
The full 200-turn run is bench/results/soak.json."""

import os

import pytest

from bench.soak import MAX_GROWTH_PCT, run_soak, summarize
from cpu_backend.runtime import CACHE_VARIABLES, KERNEL_CACHE_CAPACITY, bound_kernel_caches
from models.registry import DEFAULT_MODEL
from serving.service import ChatService

pytestmark = pytest.mark.slow  # a 30-turn session


def test_thirty_turns_keep_memory_flat_and_truncation_working(embedded_folder):
    result = run_soak(turns=30, warmup=10, max_context=256, max_new_tokens=12, progress=False)
    s, records = result["summary"], result["records"]
    print(f"\nsoak: {s}")
    assert len(records) == 30 and all(r["generated_tokens"] > 0 for r in records)
    # resident memory after the warm-up grows less than 5%
    assert s["rss_peak_growth_pct"] < MAX_GROWTH_PCT and s["rss_ok"], s
    # the history outgrew the context, and from then on every turn dropped old turns, kept recent ones, fit
    assert s["first_truncated_turn"] is not None and s["first_truncated_turn"] <= 20, s
    assert s["truncation_ok"] and s["max_prompt_tokens"] <= s["prompt_budget"] == 256 - 12, s
    assert records[-1]["dropped_turns"] >= 10


def record(turn, rss, dropped, prompt=100):
    return {"turn": turn, "history_turns": turn - 1, "rss_mib": rss, "dropped_turns": dropped, "prompt_tokens": prompt}


def test_the_soak_checks_can_fail():
    flat = [record(t, 1000 + (t % 3), max(0, t - 5)) for t in range(1, 31)]
    assert summarize(flat, 10, 200)["rss_ok"] and summarize(flat, 10, 200)["truncation_ok"]
    leak = [record(t, 1000 + 3 * t, max(0, t - 5)) for t in range(1, 31)]  # +3 MiB a turn
    assert not summarize(leak, 10, 200)["rss_ok"]
    never = [record(t, 1000, 0) for t in range(1, 31)]  # history never cut
    assert not summarize(never, 10, 200)["truncation_ok"]
    stops = [record(t, 1000, 1 if 6 <= t < 20 else 0) for t in range(1, 31)]  # cut, then not any more
    assert not summarize(stops, 10, 200)["truncation_ok"]
    too_long = [record(t, 1000, max(0, t - 5), prompt=250) for t in range(1, 31)]
    assert not summarize(too_long, 10, 200)["truncation_ok"]
    everything = [record(t, 1000, max(0, t - 1)) for t in range(1, 31)]  # drops all history: no context kept
    assert not summarize(everything, 10, 200)["truncation_ok"]


def test_the_service_caps_the_kernel_caches_before_it_builds_an_engine(embedded_folder, monkeypatch):
    """Without the cap, oneDNN/ideep keep kernels for every prompt length seen: +3 MB per new length
    (bench/results/soak_uncapped.json: +8.4% RSS over 200 turns)."""
    for name in CACHE_VARIABLES:
        monkeypatch.setenv(name, "unset")  # so that monkeypatch restores the variable's absence afterwards
        monkeypatch.delenv(name)
    ChatService().engine("cpu", DEFAULT_MODEL, "bf16")
    assert [os.environ.get(name) for name in CACHE_VARIABLES] == [str(KERNEL_CACHE_CAPACITY)] * 2
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")  # an operator's own value wins
    bound_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"
