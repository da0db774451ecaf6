"""The app's OpenAI-compatible API (/v1/models, /v1/chat/completions) through the official `openai` client
against the real server (python app.py), plus in-process checks of its error bodies, API key and start-up
refusal."""

import threading
import time

import httpx
import openai
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from models.registry import DEFAULT_MODEL
from serving.openai_api import create_router
from serving.service import ChatService
from serving.startup import NotReadyError, Step, Warmup
from tests import appserver

CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}]


@pytest.fixture(scope="module")
def server(embedded_folder):
    return appserver.shared()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=appserver.API_KEY, max_retries=0, timeout=120)


def test_models_lists_the_default_and_its_backend_scheme_ids(client):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == DEFAULT_MODEL and f"{DEFAULT_MODEL}@cpu:bf16" in ids


def test_chat_completion_answers_with_usage_and_timings(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=24)
    assert r.object == "chat.completion" and r.model == DEFAULT_MODEL
    assert "Paris" in r.choices[0].message.content and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 10 and 1 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["q8chat"]
    assert extra["backend"] == "cpu" and extra["scheme"] == "bf16" and extra["ttft_ms"] > 0 and extra["tpot_ms"] > 0


def test_a_follow_up_reports_the_prompt_tokens_it_reused(client):
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=24)
    answer = {"role": "assistant", "content": r.choices[0].message.content}
    follow = [*CAPITAL, answer, {"role": "user", "content": "Why?"}]
    r2 = client.chat.completions.create(model=DEFAULT_MODEL, messages=follow, temperature=0, max_tokens=8)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
    assert r2.usage.prompt_tokens > r2.usage.prompt_tokens_details.cached_tokens
    r3 = client.chat.completions.create(model=DEFAULT_MODEL, messages=follow, temperature=0, max_tokens=8, seed=1)
    assert r3.usage.prompt_tokens_details.cached_tokens == 0  # seeded: the whole prompt, whatever the cache holds


def test_streamed_chat_arrives_token_by_token_with_usage(client):
    stream = client.chat.completions.create(
        model=f"{DEFAULT_MODEL}@cpu:bf16",
        messages=CAPITAL,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 3  # streamed, not one blob
    assert "Paris" in "".join(pieces) and finish == "stop"
    assert usage is not None and usage.completion_tokens >= len(pieces)


def test_system_prompt_and_extra_sampling_fields_reach_the_engine(client):
    base = dict(model=DEFAULT_MODEL, temperature=0, max_tokens=6)
    q = [{"role": "user", "content": "Who are you?"}]
    plain = client.chat.completions.create(**base, messages=q).choices[0].message.content
    pirate = [{"role": "system", "content": "You are a pirate named Captain Hook. Talk like a pirate."}, *q]
    with_system = client.chat.completions.create(**base, messages=pirate).choices[0].message.content
    assert plain != with_system
    seeded = dict(model=DEFAULT_MODEL, messages=q, temperature=1.0, max_tokens=6, seed=7)
    a = client.chat.completions.create(**seeded, extra_body={"top_k": 20}).choices[0].message.content
    b = client.chat.completions.create(**seeded, extra_body={"top_k": 20}).choices[0].message.content
    assert a == b  # same seed, same sample


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"model": "no-such-model"}, openai.NotFoundError, "not found"),
        ({"messages": [{"role": "user", "content": "   "}]}, openai.BadRequestError, "empty"),
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"max_tokens": 10**7}, openai.BadRequestError, "max_new_tokens"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, openai.BadRequestError, "last message"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, openai.BadRequestError, "not supported"),
        ({"messages": []}, openai.BadRequestError, "non-empty"),
        ({"n": 2}, openai.BadRequestError, "n=1"),
        ({"extra_body": {"scheme": "w4a4-magic"}}, openai.BadRequestError, "scheme"),
        ({"extra_body": {"backend": "tpu"}}, openai.BadRequestError, "unknown backend"),
        ({"extra_body": {"colour": "red"}}, openai.BadRequestError, "unknown field"),
    ],
)
def test_bad_requests_get_openai_style_errors(client, kwargs, error, words):
    args = {"model": DEFAULT_MODEL, "messages": CAPITAL, "max_tokens": 8, **kwargs}
    with pytest.raises(error) as e:
        client.chat.completions.create(**args)
    body = e.value.body
    assert words in body["message"] and body["type"] in ("invalid_request_error", "server_error")
    assert "Traceback" not in e.value.response.text


def test_unavailable_gpu_is_a_503_with_the_reason(client):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=f"{DEFAULT_MODEL}@gpu:bf16", messages=CAPITAL, max_tokens=4)
    assert e.value.status_code == 503 and "GPU" in e.value.body["message"] and "CUDA" in e.value.body["message"]


def test_wrong_api_key_is_refused(server):
    bad = openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert "API key" in e.value.body["message"]


def test_malformed_json_is_a_400(server):
    r = httpx.post(
        server.url + "v1/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {appserver.API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"


def test_a_client_that_leaves_mid_stream_frees_the_engine(client):
    long = [{"role": "user", "content": "Count from one to five hundred in words, one number per line."}]
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=long, temperature=0, max_tokens=1500, stream=True
    )
    got = 0
    for chunk in stream:
        got += bool(chunk.choices and chunk.choices[0].delta.content)
        if got == 5:
            break
    stream.close()
    start = time.perf_counter()
    r = client.chat.completions.create(model=DEFAULT_MODEL, messages=CAPITAL, temperature=0, max_tokens=8)
    waited = time.perf_counter() - start
    assert r.choices[0].message.content
    # An engine still busy with the abandoned 1500-token answer would hold this request for the rest of it;
    # the bound scales with this machine's own speed right now (tpot of the request just served).
    tpot_s = r.model_extra["q8chat"]["tpot_ms"] / 1000
    assert waited < 5 + 300 * tpot_s, (waited, tpot_s)


def test_concurrent_clients_get_their_own_answers(client):
    questions = {"France": "Paris", "Japan": "Tokyo"}
    answers = {}

    def ask(country):
        messages = [{"role": "user", "content": f"What is the capital of {country}?"}]
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, temperature=0, max_tokens=24, stream=True
        )
        answers[country] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(c,)) for c in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for country, capital in questions.items():
        assert capital in answers[country] and not any(o in answers[country] for o in questions if o != country)


# ---- in-process: the router alone (no model loaded) ----


def test_chats_are_refused_with_progress_while_the_model_loads():
    release = threading.Event()
    warmup = Warmup()
    warmup.start([Step("loading the test model", lambda: release.wait(30), ("cpu", "bf16"))])
    try:
        api = FastAPI()
        api.include_router(create_router(ChatService(), warmup))
        with TestClient(api) as http:
            r = http.post("/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": CAPITAL})
            assert r.status_code == 503
            message = r.json()["error"]["message"]
            assert "loading (0%: loading the test model)" in message and "try again" in message
            with pytest.raises(NotReadyError):
                warmup.check("cpu", "bf16")
            assert warmup.status()["state"] == "loading"
    finally:
        release.set()
        warmup.thread.join(timeout=30)
    assert warmup.status()["state"] == "ready" and warmup.status()["progress"] == 100
    warmup.check("cpu", "bf16")  # no longer refused


def test_api_key_is_required_when_set(monkeypatch):
    monkeypatch.setenv("Q8CHAT_API_KEY", "s3cret")
    api = FastAPI()
    api.include_router(create_router(ChatService(), Warmup()))
    with TestClient(api) as http:
        r = http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication"
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = http.post("/v1/chat/completions", json={"model": DEFAULT_MODEL, "messages": CAPITAL})
        assert r.status_code == 401


def test_operator_allowed_models_are_listed_and_served(tmp_path, embedded_folder, monkeypatch):
    from models.registry import MODEL_DIRS_ENV
    from tests.quant_fixtures import write_tiny_folder

    tiny = write_tiny_folder(tmp_path / "tiny", embedded_folder)
    monkeypatch.setenv(MODEL_DIRS_ENV, str(tmp_path))
    api = FastAPI()
    api.include_router(create_router(ChatService(), Warmup()))
    with TestClient(api) as http:
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert str(tiny) in ids and f"{tiny}@cpu:w8a8-int8" in ids
        r = http.post("/v1/chat/completions", json={"model": str(tiny), "messages": CAPITAL, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == str(tiny)
        assert r.json()["usage"]["completion_tokens"] >= 1
        outside = http.post("/v1/chat/completions", json={"model": "/etc", "messages": CAPITAL})
        assert outside.status_code == 404 and "outside the folders" in outside.json()["error"]["message"]
        huge = http.post("/v1/chat/completions", json={"model": str(tiny), "messages": CAPITAL, "seed": 1e30})
        assert huge.status_code == 400 and "seed must be a whole number" in huge.json()["error"]["message"]
