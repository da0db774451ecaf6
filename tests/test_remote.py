"""The remote backend against a real OpenAI-compatible server started by the test.

The server is q8chat itself (``python app.py``, its /v1/chat/completions, which tests/test_api.py proves
with the official ``openai`` client): cheap to start offline on the embedded model. llama-cpp-python's
``llama_cpp.server`` would do as well but compiles for ~10 minutes on this machine (no prebuilt wheel).
"""

import threading

import pytest

import app
from models.backend import RequestError, SamplingParams
from models.registry import DEFAULT_MODEL
from remote_backend.engine import RemoteEngine
from serving.service import ChatService, ChatSettings, backend_availability
from tests import appserver, page

CAPITAL = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def server(embedded_folder):
    return appserver.shared()


@pytest.fixture
def remote(server, monkeypatch):
    monkeypatch.setenv("Q8CHAT_REMOTE_URL", server.url + "v1")
    monkeypatch.setenv("Q8CHAT_REMOTE_API_KEY", appserver.API_KEY)
    monkeypatch.delenv("Q8CHAT_REMOTE_MODEL", raising=False)
    monkeypatch.delenv("Q8CHAT_REMOTE_API_KEY_ENV", raising=False)
    return server


def settings(max_new=24, system=""):
    return ChatSettings("remote", DEFAULT_MODEL, "remote", system, SamplingParams(max_new_tokens=max_new))


def test_remote_is_listed_unavailable_with_the_reason_until_configured(monkeypatch):
    monkeypatch.delenv("Q8CHAT_REMOTE_URL", raising=False)
    ok, reason = backend_availability("remote")
    assert not ok and "--remote-url" in reason
    choices, notes = app.backend_choices()
    assert ("REMOTE (unavailable)", "remote") in choices and "REMOTE unavailable" in notes
    monkeypatch.setenv("Q8CHAT_REMOTE_URL", "ftp://example")
    ok, reason = backend_availability("remote")
    assert not ok and "http://host:port/v1" in reason
    monkeypatch.setenv("Q8CHAT_REMOTE_URL", "http://127.0.0.1:9/v1")
    assert backend_availability("remote") == (True, "")
    assert ("REMOTE", "remote") in app.backend_choices()[0]


def test_remote_answer_streams_with_timings_from_the_server(remote):
    updates = list(ChatService().chat(CAPITAL, [], settings()))
    assert len(updates) > 3  # streamed
    last = updates[-1]
    assert last.done and last.finish_reason == "eos" and "Paris" in last.text
    t = last.timings
    assert last.backend == "remote" and last.scheme == "remote"
    assert t.ttft_ms > 0 and t.tpot_ms > 0 and t.prompt_tokens > 10  # the server's own token count
    assert t.generated_tokens >= len([u for u in updates if not u.done])


def test_remote_gets_the_system_prompt_and_cuts_long_history(remote, monkeypatch):
    monkeypatch.setenv("Q8CHAT_REMOTE_CONTEXT", "300")
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Tell me fact number {i}."}, {"role": "assistant", "content": "OK."}]
    updates = list(ChatService().chat(CAPITAL, history, settings(max_new=16, system="Answer briefly.")))
    assert updates[-1].dropped_turns > 0 and updates[-1].text


def test_remote_stop_ends_the_answer(remote):
    cancel = threading.Event()
    updates = []
    long = "Count from one to five hundred in words, one number per line."
    for update in ChatService().chat(long, [], settings(max_new=400), cancel):
        updates.append(update)
        if len(updates) == 3:
            cancel.set()
    assert updates[-1].finish_reason == "cancelled" and len(updates) < 10


def test_remote_errors_are_messages(remote, monkeypatch):
    monkeypatch.setenv("Q8CHAT_REMOTE_API_KEY", "wrong-key")
    with pytest.raises(RequestError, match="answered 401: a valid API key is required"):
        list(ChatService().chat(CAPITAL, [], settings()))
    monkeypatch.setenv("Q8CHAT_REMOTE_API_KEY", appserver.API_KEY)
    monkeypatch.setenv("Q8CHAT_REMOTE_MODEL", "no-such-model")
    with pytest.raises(RequestError, match="answered 404: model 'no-such-model' not found"):
        list(ChatService().chat(CAPITAL, [], settings()))
    monkeypatch.delenv("Q8CHAT_REMOTE_MODEL")
    with pytest.raises(RequestError, match="answered 400: .*role"):  # the server's own validation, passed on
        chat = [{"role": "tool", "content": "42"}, {"role": "user", "content": CAPITAL}]
        list(RemoteEngine(DEFAULT_MODEL).generate(chat, SamplingParams()))
    monkeypatch.setenv("Q8CHAT_REMOTE_URL", f"http://127.0.0.1:{appserver.free_port()}/v1")
    with pytest.raises(RequestError, match="cannot reach the remote server"):
        list(ChatService().chat(CAPITAL, [], settings()))
    with pytest.raises(RequestError, match="does not apply to a remote server"):
        RemoteEngine(DEFAULT_MODEL, "w8a8-int8")


def test_the_page_chats_through_the_remote_backend(remote):
    outputs = list(page.respond(CAPITAL, backend="remote", scheme="remote", max_new=24, top_p=1.0, session="remote"))
    history, box, status = outputs[-1]
    assert status == "" and box == "" and len(outputs) > 3
    answer = history[1]["content"]
    assert "Paris" in answer and "REMOTE" in answer.splitlines()[-1] and "ms/token" in answer
