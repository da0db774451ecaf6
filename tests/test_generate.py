"""Generation on the CPU engine: greedy answers, sampling, stopping, cancellation, timings."""

import math
import threading

import pytest
import torch

from models.backend import RequestError, SamplingParams
from models.chat import build_prompt
from models.generate import TextStream, sample


def run(engine, message, cancel=None, **params):
    ids = build_prompt(engine.tokenizer, message).ids
    events = list(engine.generate_ids(ids, SamplingParams(**params), cancel))
    text = "".join(e.text for e in events)
    return text, events[-1], [e.token_id for e in events if e.token_id is not None]


def test_greedy_answer_is_sensible_and_stops_on_eos(cpu_engine):
    text, last, _ = run(cpu_engine, "What is the capital of France? Answer in one short sentence.", max_new_tokens=64)
    assert "Paris" in text
    assert last.finished and last.finish_reason == "eos"
    t = last.timings
    assert t.prompt_tokens > 10 and 1 < t.generated_tokens < 64
    assert t.ttft_ms > 0 and t.tpot_ms > 0 and t.tokens_per_s > 0


def test_max_new_tokens_is_respected(cpu_engine):
    _, last, tokens = run(cpu_engine, "Write a long story about a dragon.", max_new_tokens=7)
    assert last.finish_reason == "length" and len(tokens) == 7 == last.timings.generated_tokens


def test_sampling_is_reproducible_by_seed(cpu_engine):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.1)
    a = run(cpu_engine, "Tell me about cats.", seed=7, **kw)[2]
    b = run(cpu_engine, "Tell me about cats.", seed=7, **kw)[2]
    c = run(cpu_engine, "Tell me about cats.", seed=8, **kw)[2]
    assert a == b
    assert a != c


def test_cancellation_from_another_thread_and_no_state_left(cpu_engine):
    before, _, _ = run(cpu_engine, "What is the capital of France? Answer in one short sentence.", max_new_tokens=32)
    cancel = threading.Event()
    ids = build_prompt(cpu_engine.tokenizer, "Count from one to one thousand.").ids
    seen = []
    for event in cpu_engine.generate_ids(ids, SamplingParams(max_new_tokens=500), cancel):
        seen.append(event)
        if len(seen) == 3:
            threading.Thread(target=cancel.set).start()
    assert seen[-1].finish_reason == "cancelled"
    assert seen[-1].timings.generated_tokens < 20
    after, _, _ = run(cpu_engine, "What is the capital of France? Answer in one short sentence.", max_new_tokens=32)
    assert after == before
    assert not cpu_engine.lock.locked()


def test_abandoned_stream_releases_the_engine(cpu_engine):
    ids = build_prompt(cpu_engine.tokenizer, "Hello").ids
    stream = cpu_engine.generate_ids(ids, SamplingParams(max_new_tokens=50))
    next(stream)
    assert cpu_engine.lock.locked()
    stream.close()
    assert not cpu_engine.lock.locked()


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(max_new_tokens=10**9), "max_new_tokens"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens="12"), "integer"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=math.nan), "NaN"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-3), "top_k"),
        (dict(repetition_penalty=100.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
        (dict(seed=True), "seed"),
    ],
)
def test_bad_sampling_parameters_are_refused(params, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**params).validate()


def test_prompt_longer_than_the_context_is_refused(cpu_engine):
    with pytest.raises(RequestError, match="context"):
        next(cpu_engine.generate_ids([1] * (cpu_engine.context_length + 1), SamplingParams()))


def test_sampler_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, greedy, None, None) == 1
    rng = torch.Generator().manual_seed(0)
    only_top = SamplingParams(temperature=1.0, top_k=1)
    assert {sample(logits, only_top, None, rng) for _ in range(20)} == {1}
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    assert {sample(logits, nucleus, None, rng) for _ in range(20)} == {1}
    # repetition penalty 2: positive logit 3 -> 1.5 < 2, so token 2 wins greedily
    penalised = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, penalised, torch.tensor([1]), None) == 2


def test_tiny_temperature_is_greedy_not_nan():
    # found by the API fuzz: logits / 7e-59 overflowed to inf, softmax gave NaN, multinomial raised
    logits = torch.tensor([0.5, 3.0, -1.0, 2.9])
    for t in (7e-59, 1e-6, 5e-5):
        assert sample(logits, SamplingParams(temperature=t, seed=1), None, torch.Generator().manual_seed(1)) == 1
    assert SamplingParams(temperature=0.01).greedy is False


def test_text_stream_never_splits_characters(cpu_engine):
    tok = cpu_engine.tokenizer
    text = "Crème brûlée 🍮 costs 5€ — 日本語 too."
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_next_turn_prefills_only_the_new_tokens(cpu_engine):
    """A chat's next turn repeats the conversation: the cache still holds it, so the prefill covers only the
    new tokens (reported as cached_tokens) and the answer is the one a cold prefill of the whole prompt gives."""
    gen = cpu_engine.generator
    q1 = "What is the capital of France? Answer in one short sentence."
    first, last1, _ = run(cpu_engine, q1, max_new_tokens=32)
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": first}]
    ids = build_prompt(cpu_engine.tokenizer, "And of Italy?", history).ids
    calls = []
    prefill = gen.prefill
    gen.prefill = lambda x, start=0: calls.append((x.shape[1], start)) or prefill(x, start)
    try:
        events = list(cpu_engine.generate_ids(ids, SamplingParams(max_new_tokens=32)))
    finally:
        del gen.prefill
    warm = "".join(e.text for e in events)
    reused = events[-1].timings.cached_tokens
    assert reused >= last1.timings.prompt_tokens and calls == [(len(ids) - reused, reused)]
    gen.reuses_prefix = False
    try:
        cold_events = list(cpu_engine.generate_ids(ids, SamplingParams(max_new_tokens=32)))
    finally:
        gen.reuses_prefix = True
    assert cold_events[-1].timings.cached_tokens == 0
    assert warm == "".join(e.text for e in cold_events) and "Rome" in warm


def test_the_cache_is_reused_only_where_it_holds_the_prompt(cpu_engine):
    """After a stream is abandoned the cache holds the prompt and the tokens decoded so far, nothing more; a prompt
    that differs from the first token on reuses nothing."""
    gen = cpu_engine.generator
    ids = build_prompt(cpu_engine.tokenizer, "Write a long story about a dragon.").ids
    stream = cpu_engine.generate_ids(ids, SamplingParams(max_new_tokens=50, ignore_eos=True))
    tokens = [next(stream).token_id for _ in range(5)]
    stream.close()
    assert gen.cached == ids + tokens[:4]  # the fifth was sampled but never decoded into the cache
    assert gen.reusable(ids + tokens + [1, 2]) == len(ids) + 4
    assert gen.reusable([ids[0] + 1] + ids[1:]) == 0
    assert gen.reusable(ids[:3]) == 2  # the last prompt token is always prefilled again (its logits are needed)


def test_a_seeded_request_does_not_depend_on_the_cache(cpu_engine):
    """Same seed, same tokens, whatever the cache held before (a seeded request prefills its whole prompt)."""
    kw = dict(max_new_tokens=12, temperature=1.0, seed=3)
    ids = build_prompt(cpu_engine.tokenizer, "Tell me about dogs.").ids
    a = list(cpu_engine.generate_ids(ids, SamplingParams(**kw)))
    b = list(cpu_engine.generate_ids(ids, SamplingParams(**kw)))  # the cache now holds this prompt and its answer
    assert b[-1].timings.cached_tokens == 0
    assert [e.token_id for e in a] == [e.token_id for e in b]
