"""Property-based fuzz of the chat entry points: every odd input gets a clear message, never a traceback,
and the next normal request still works."""

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app
from models.backend import RequestError, SamplingParams
from serving.service import ChatSettings
from tests import page

TEXT = st.one_of(
    st.just(""),
    st.text(alphabet=st.sampled_from(" \t\n\r\x0b\x0c"), max_size=20),
    st.text(max_size=200),  # any Unicode incl. control characters
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=5),
    st.builds(lambda c, n: c * n, st.sampled_from("a€🙂\x00"), st.integers(1_000, 100_000)),
)
NUMBER = st.one_of(
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.text(max_size=5),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
ANSWERED: list[str] = []
API_ANSWERED: list[str] = []
# valid but long generations would only slow the fuzz down: cap valid token budgets at 8
MAX_NEW = NUMBER.map(lambda v: 8 if type(v) is int and 8 < v <= 4096 else v)
SETTINGS = settings(max_examples=110, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def ui_outcome(message, **overrides):
    return page.ask(message, session="fuzz", **{"max_new": 4, **overrides})


@SETTINGS
@given(
    message=TEXT,
    system=TEXT,
    max_new=NUMBER,
    temperature=NUMBER,
    top_p=NUMBER,
    top_k=NUMBER,
    rep=NUMBER,
    seed=NUMBER,
    backend=st.sampled_from(["cpu", "gpu", "tpu", "", "CPU"]),
    scheme=st.sampled_from(["bf16", "w8a8-fp8", "nope", ""]),
    model=st.sampled_from(["smollm2-135m", "", "../etc"]),
)
def test_ui_handler_never_raises(
    cpu_engine, message, system, max_new, temperature, top_p, top_k, rep, seed, backend, scheme, model
):
    history, box, status = ui_outcome(
        message,
        system=system,
        max_new=max_new if max_new is not None else 4,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        rep=rep,
        seed=seed,
        backend=backend,
        scheme=scheme,
        model=model,
    )
    assert "Traceback" not in status and "Traceback" not in str(history)
    if status:  # refused: a message for the person, the typed text kept
        assert status.startswith("**Cannot answer:**") and len(status) > len("**Cannot answer:** ")
        assert box == message and history == []
    else:
        assert history[-1]["role"] == "assistant" and "TTFT" in history[-1]["content"]
        ANSWERED.append(message)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(message=TEXT, system=st.one_of(st.just(""), TEXT))
def test_odd_text_with_sane_settings_is_answered_or_refused_clearly(cpu_engine, message, system):
    history, box, status = ui_outcome(message, system=system, max_new=2)
    if status:
        assert any(w in status for w in ("empty", "tokens but only", "must be text")), status
        assert box == message
    else:
        assert "TTFT" in history[-1]["content"]
        ANSWERED.append(message)


@SETTINGS
@given(max_new=NUMBER, temperature=NUMBER, top_p=NUMBER, top_k=NUMBER, rep=NUMBER, seed=NUMBER)
def test_sampling_validation_accepts_only_sane_values(max_new, temperature, top_p, top_k, rep, seed):
    params = SamplingParams(
        max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=rep, seed=seed
    )
    try:
        params.validate()
    except RequestError as e:
        assert str(e)
        return
    assert isinstance(max_new, int) and 1 <= max_new <= 4096
    assert math.isfinite(temperature) and 0 <= temperature <= 2
    assert 0 < top_p <= 1 and 0.5 <= rep <= 2 and (seed is None or seed >= 0)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
API_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "", 5]), "content": TEXT | JSONISH}
)
API_BODY = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["smollm2-135m", "smollm2-135m@cpu:bf16", "smollm2-135m@tpu:x", "nope", "", 3, None]),
        "messages": st.lists(API_MESSAGE, max_size=3) | JSONISH,
        "max_tokens": MAX_NEW,
    },
    optional={
        "temperature": NUMBER, "top_p": NUMBER, "top_k": NUMBER, "seed": NUMBER, "stream": st.booleans() | NUMBER,
        "stop": JSONISH, "n": NUMBER, "scheme": st.sampled_from(["bf16", "w8a8-fp8", "x", 1]),
        "backend": st.sampled_from(["cpu", "gpu", "tpu", "", None]), "surprise": JSONISH,
    },
)

USER_MESSAGE = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT})
SANE_BODY = st.fixed_dictionaries(
    {"model": st.just("smollm2-135m"), "messages": st.lists(USER_MESSAGE, min_size=1, max_size=2),
     "max_tokens": st.integers(1, 4)},
    optional={"temperature": st.floats(0, 2), "stream": st.booleans(), "seed": st.integers(0, 99)},
)


@pytest.fixture(scope="module")
def api(cpu_engine):
    """The OpenAI-compatible API in process, on the app's service (the loaded CPU engine)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serving.openai_api import create_router
    from serving.startup import Warmup

    server = FastAPI()
    server.include_router(create_router(app.service, Warmup()))
    with TestClient(server, raise_server_exceptions=False) as http:
        yield http


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=SANE_BODY | API_BODY | JSONISH, raw=st.none() | st.none() | st.binary(max_size=64))
def test_openai_api_answers_or_refuses_in_openai_form(api, body, raw):
    content = raw if raw is not None else json.dumps(body)  # NaN / Infinity too, as a careless client sends them
    r = api.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404, 503), (r.status_code, r.text[:300])
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]")
        API_ANSWERED.append(content[:50])
    else:
        assert isinstance(r.json()["choices"][0]["message"]["content"], str)
        API_ANSWERED.append(content[:50])


def test_normal_request_works_after_the_fuzz(cpu_engine, api):
    assert len(ANSWERED) >= 5 and len(API_ANSWERED) >= 5  # the fuzz reached the answering path, not only refusals
    question = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]
    r = api.post("/v1/chat/completions",
                 json={"model": "smollm2-135m", "max_tokens": 16, "temperature": 0, "messages": question})
    assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
    *_, update = app.service.chat(question[0]["content"], [], ChatSettings(sampling=SamplingParams(32)))
    assert "Paris" in update.text and update.done
