"""The Gradio page's handlers in-process, and the real server through gradio_client."""

import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import app
from tests import appserver

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(
    backend="cpu",
    model="smollm2-135m",
    scheme="bf16",
    system="",
    max_new=64,
    temperature=0.0,
    top_p=0.9,
    top_k=0,
    rep=1.0,
    seed=None,
)


def respond(message, history=None, session="s1", **overrides):
    a = {**DEFAULTS, **overrides}
    return app.respond(
        message,
        history or [],
        a["backend"],
        a["model"],
        a["scheme"],
        a["system"],
        a["max_new"],
        a["temperature"],
        a["top_p"],
        a["top_k"],
        a["rep"],
        a["seed"],
        SimpleNamespace(session_hash=session),
    )


def test_answer_streams_with_a_metrics_line(cpu_engine):
    outputs = list(respond("What is the capital of France? Answer in one short sentence."))
    assert len(outputs) > 3  # streamed, not one final blob
    history, box, status = outputs[-1]
    assert box == "" and status == ""
    assert history[0] == {"role": "user", "content": "What is the capital of France? Answer in one short sentence."}
    answer = history[1]["content"]
    assert "Paris" in answer
    metrics = answer.splitlines()[-1]
    assert metrics.startswith("`TTFT") and "ms/token" in metrics and "tokens/s" in metrics and "CPU" in metrics
    assert "bf16" in metrics


def test_second_turn_sends_history_without_metrics(cpu_engine, monkeypatch):
    history = list(respond("My name is Ada. Remember it."))[-1][0]
    sent = []
    real_chat = app.service.chat

    def spy(message, hist, settings, cancel=None):
        sent.append(hist)
        return real_chat(message, hist, settings, cancel)

    monkeypatch.setattr(app.service, "chat", spy)
    history2 = list(respond("What is my name?", history, max_new=16))[-1][0]
    assert len(history2) == 4
    assert sent[0][0] == {"role": "user", "content": "My name is Ada. Remember it."}
    assert sent[0][1]["role"] == "assistant" and sent[0][1]["content"]
    assert "TTFT" not in sent[0][1]["content"] and sent[0][1]["content"] in history[1]["content"]
    assert "cached)" in history2[3]["content"].splitlines()[-1]  # the first turn's keys and values were reused


def test_stop_button_ends_the_answer_mid_stream(cpu_engine):
    stream = respond("Count from one to one thousand, one number per line.", session="stopper", max_new=400)
    outputs = []
    for out in stream:
        outputs.append(out)
        if len(outputs) == 5:
            app.stop(SimpleNamespace(session_hash="stopper"))
    answer = outputs[-1][0][1]["content"]
    assert "stopped" in answer.splitlines()[-1]
    assert len(outputs) < 30
    assert not cpu_engine.lock.locked()


@pytest.mark.parametrize(
    "overrides, message, expected",
    [
        ({}, "   ", "empty"),
        ({"model": "no-such-model"}, "hi", "unknown model"),
        ({"max_new": 10**7}, "hi", "max_new_tokens"),
        ({"temperature": -2}, "hi", "temperature"),
        ({"scheme": "w4a4-magic"}, "hi", "scheme"),
        ({"backend": "tpu"}, "hi", "unknown backend"),
    ],
)
def test_bad_input_gives_a_message_and_keeps_the_text(cpu_engine, overrides, message, expected):
    outputs = list(respond(message, [{"role": "user", "content": "old"}], **overrides))
    history, box, status = outputs[-1]
    assert status.startswith("**Cannot answer:**") and expected in status
    assert box == message  # nothing the user typed is lost
    assert history == [{"role": "user", "content": "old"}]
    assert "Traceback" not in status


def test_gpu_is_listed_and_disabled_with_a_reason_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    choices, notes = app.backend_choices()
    assert ("GPU (unavailable)", "gpu") in choices and ("CPU", "cpu") in choices
    assert "GPU unavailable" in notes and len(notes) > len("GPU unavailable: ")


def test_chat_api_returns_plain_answer_text(cpu_engine):
    answer = app.chat_api("What is the capital of France? Answer in one short sentence.")
    assert "Paris" in answer and "TTFT" not in answer


@pytest.fixture(scope="module")
def server(embedded_folder):
    """The real server (python app.py), once its start-up (model load) is done."""
    srv = appserver.shared()
    yield srv.url, srv.port


def test_server_answers_through_gradio_client(server):
    from gradio_client import Client

    url, _ = server
    client = Client(url, verbose=False)
    assert "Paris" in client.predict("What is the capital of France? Answer in one short sentence.", api_name="/chat")
    with pytest.raises(Exception, match="empty"):
        client.predict("  ", api_name="/chat")
    # the server keeps working after a refused request
    assert client.predict("Say hello.", max_new_tokens=8, api_name="/chat")


def test_server_binds_loopback_only(server):
    _, port = server
    addresses = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    for addr in addresses - {"127.0.0.1"}:
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex((addr, port)) != 0, f"app reachable on {addr}"


def test_concurrent_api_calls_get_their_own_answers(server):
    from gradio_client import Client

    url, _ = server
    questions = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin"}
    answers = {}

    def ask(country):
        answers[country] = Client(url, verbose=False).predict(
            f"What is the capital of {country}?", max_new_tokens=24, api_name="/chat"
        )

    threads = [threading.Thread(target=ask, args=(c,)) for c in questions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for country, capital in questions.items():  # each its own answer: no cross-talk
        assert country in answers[country] and capital in answers[country], answers
        assert not any(other in answers[country] for other in questions if other != country), answers
