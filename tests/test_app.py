"""The Gradio page's handlers in-process, and the real server through gradio_client."""

import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from models.backend import RequestError
from tests import appserver, page
from tests.page import ask, respond
from ui import chat, compare, shared

ROOT = Path(__file__).resolve().parents[1]


def test_answer_streams_with_a_metrics_line(cpu_engine):
    outputs = list(respond("What is the capital of France? Answer in one short sentence."))
    assert len(outputs) > 3  # streamed, not one final blob
    first_chat, _, first_status = outputs[0]  # the question shows at once, with what the engine is doing
    assert first_chat[0]["content"].startswith("What is the capital") and "prompt tokens" in first_status
    history, box, status = outputs[-1]
    assert box == "" and status == ""
    assert history[0] == {"role": "user", "content": "What is the capital of France? Answer in one short sentence."}
    answer = history[1]["content"]
    assert "Paris" in answer
    metrics = answer.splitlines()[-1]
    assert metrics.startswith("`TTFT") and "ms/token" in metrics and "tokens/s" in metrics and "CPU" in metrics
    assert "bf16" in metrics


def test_second_turn_sends_history_without_metrics(cpu_engine, monkeypatch):
    history = ask("My name is Ada. Remember it.")[0]
    sent = []
    real_chat = shared.service.chat

    def spy(message, hist, settings, cancel=None):
        sent.append(hist)
        return real_chat(message, hist, settings, cancel)

    monkeypatch.setattr(shared.service, "chat", spy)
    history2 = ask("What is my name?", history, max_new=16)[0]
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
            shared.stop(SimpleNamespace(session_hash="stopper"))
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
    choices, notes = chat.backend_choices()
    assert ("GPU (unavailable)", "gpu") in choices and ("CPU", "cpu") in choices
    assert "GPU unavailable" in notes and len(notes) > len("GPU unavailable: ")


def test_chat_api_returns_plain_answer_text(cpu_engine):
    answer = chat.chat_api("What is the capital of France? Answer in one short sentence.")
    assert "Paris" in answer and "TTFT" not in answer


def test_empty_seed_stays_random_and_a_huge_seed_gets_a_plain_message(cpu_engine):
    assert chat.parse_seed("") is None and chat.parse_seed(None) is None and chat.parse_seed(" 42 ") == 42
    for bad in ("1e30", "-1", str(2**63), "abc", 1e30):
        with pytest.raises(RequestError, match="whole number"):
            chat.parse_seed(bad)
    _, box, status = ask("Hi", seed="1e30")
    assert "seed must be a whole number" in status and box == "Hi" and "Overflow" not in status
    story = "Write one sentence about a cat."
    answers = {ask(story, seed="", temperature=1.0, top_p=1.0, max_new=24)[0][-1]["content"] for _ in range(2)}
    assert len(answers) == 2, answers  # random: not the same answer every time
    same = {ask(story, seed="7", temperature=1.0, max_new=24)[0][-1]["content"].split("`TTFT")[0] for _ in range(2)}
    assert len(same) == 1


def run_chat(session, *messages_while_running, history=None, **overrides):
    """Sends the first message as the page does (take, then run_chat), and the others while it answers."""
    a = {**DEFAULTS_PAGE, **overrides}
    request = SimpleNamespace(session_hash=session)
    box, shown, _ = chat.take(messages_while_running[0], history or [], request)
    assert box == "" and shown[-1]["content"] == messages_while_running[0]
    outputs = []
    statuses = []
    for out in chat.run_chat(shown, *(a[k] for k in chat.SETTINGS), request):
        outputs.append(out)
        if len(outputs) == 3:
            for later in messages_while_running[1:]:
                box, shown_later, status = chat.take(later, out[0], request)
                statuses.append(status)
                assert box == "" and isinstance(shown_later, type(gr.skip()))  # not shown in the chat mid-answer
    return outputs, statuses


DEFAULTS_PAGE = {**page.DEFAULTS, "max_new": 48, "seed": ""}  # the page's seed box is text: empty = random


def test_a_message_sent_mid_answer_is_queued_shown_and_answered_next(cpu_engine):
    outputs, statuses = run_chat("queue", "Count from one to thirty in words.", "What is the capital of Italy?")
    assert "Queued (1)" in statuses[0] and "capital of Italy" in statuses[0]
    assert any("Queued (1)" in (out[2] or "") for out in outputs[3:])  # the status keeps showing it
    history = outputs[-1][0]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[2]["content"] == "What is the capital of Italy?" and "TTFT" in history[3]["content"]
    assert all(isinstance(out[1], type(gr.skip())) for out in outputs)  # the box (a draft) is never overwritten
    assert outputs[-1][3]["value"] == "Send" and outputs[-1][5] == history  # idle again; saved in the browser


def test_a_second_trigger_while_answering_changes_nothing():
    request = SimpleNamespace(session_hash="second-trigger")
    shared.session(request).running = True
    try:
        outputs = list(chat.run_chat([], *(DEFAULTS_PAGE[k] for k in chat.SETTINGS), request))
    finally:
        shared.session(request).running = False
    assert outputs == [(gr.skip(),) * 6]  # every output skipped: nothing on the page is blanked


def test_regenerate_and_edit_answer_again(cpu_engine):
    outputs, _ = run_chat("regen", "What is the capital of France? Answer in one short sentence.")
    history = outputs[-1][0]
    request = SimpleNamespace(session_hash="regen")
    kept = chat.retry(history, SimpleNamespace(index=0, value=history[0]["content"]), request)
    again = list(chat.run_chat(kept, *(DEFAULTS_PAGE[k] for k in chat.SETTINGS), request))[-1][0]
    assert len(again) == 2 and again[0] == history[0] and "TTFT" in again[1]["content"]
    edited = chat.edit(history, SimpleNamespace(index=0, value="What is the capital of Japan?"), request)
    answer = list(chat.run_chat(edited, *(DEFAULTS_PAGE[k] for k in chat.SETTINGS), request))[-1][0]
    assert answer[0]["content"] == "What is the capital of Japan?" and "Tokyo" in answer[1]["content"]


def test_stop_puts_queued_messages_back_in_the_box():
    request = SimpleNamespace(session_hash="stop-queue")
    shared.session(request).pending.extend(["first", "second"])
    box, status = chat.stop("draft", request)
    assert box == "draft\nfirst\nsecond" and "2 queued" in status and not shared.session(request).pending


def test_every_chart_update_colors_every_label():
    """Gradio fixes a colored plot's color domain at its first draw: each update must carry a color map naming every
    label it shows (that also makes Gradio redraw), or the new bars are drawn without a color (invisible)."""
    rows = []
    for run, engines in enumerate((["CPU bf16"], ["CPU bf16", "CPU w8a8-int8"], ["OpenVINO bf16"]), start=1):
        rows += [
            {"run": run, "engine": e, "ttft_ms": 10.0 * run, "tpot_ms": 5.0, "tokens_per_s": 200.0} for e in engines
        ]
        for update in [*compare.bar_plots(rows, "smollm2-135m"), compare.timeline(rows)]:
            assert set(update["value"]["engine"]) <= set(update["color_map"]), update
    bars = compare.bar_plots(rows, "smollm2-135m")[2]["value"]
    assert "#2 CPU w8a8-int8" in set(bars["bar"]) and any("recorded" in b for b in bars["bar"])
    assert list(compare.timeline(rows)["value"]["run"].unique()) == ["run 1", "run 2", "run 3"]  # whole runs


def test_verdict_names_the_faster_engine_and_by_how_much():
    rows = [
        {"run": 4, "engine": "CPU bf16", "ttft_ms": 90.0, "tokens_per_s": 50.0},
        {"run": 4, "engine": "CPU w8a8-int8", "ttft_ms": 60.0, "tokens_per_s": 100.0},
    ]
    line = compare.verdict(4, rows, "smollm2-135m")
    assert "Run 4: CPU w8a8-int8 is 2.0× faster than CPU bf16" in line and "TTFT 60 vs 90 ms" in line
    assert "Recorded, not live" in line and "NVIDIA" in line
    assert compare.cpu_isa()[1] in compare.isa_note() and compare.cpu_isa()[1] in ("AMX", "AVX-512 VNNI", "none")


def test_compare_stop_ends_every_column(cpu_engine):
    request = SimpleNamespace(session_hash="compare-stop")
    names = compare.live_backends()
    stream = compare.compare(
        "Count from one to one hundred in words.", names, "smollm2-135m", "", 256, {}, [], [], request
    )
    outputs = []
    for out in stream:
        outputs.append(out)
        if len(outputs) == 4:
            compare.stop(request)
    answers = dict(zip(names, outputs[-1][: len(names)], strict=True))
    assert "stopped" in answers["cpu"].splitlines()[-1]
    assert all(answers[n] == "*stopped before it started*" for n in names[1:]), answers
    assert len(outputs) < 40


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


def test_a_checkpoint_build_shows_its_stage_layer_and_a_progress_bar(monkeypatch):
    """While a load waits on the shared pipeline, the chat and the status name the build's stage and layer, and
    the event's progress bar follows it."""

    from models.backend import Timings
    from quant.progress import BuildProgress
    from serving.service import ChatUpdate

    release = threading.Event()

    def loading_chat(message, history, settings, cancel=None):
        release.wait(10)
        yield ChatUpdate("Paris.", done=True, timings=Timings(prompt_tokens=9, generated_tokens=2), backend="cpu",
                         scheme=settings.scheme)  # fmt: skip

    monkeypatch.setattr(shared.service, "is_loaded", lambda *a: False)
    monkeypatch.setattr(shared.service, "chat", loading_chat)
    monkeypatch.setattr(chat, "build_progress", lambda: BuildProgress("alpha search", 11, 30))
    monkeypatch.setattr(chat, "WAIT_TICK_S", 0.05)
    bars = []
    args = {**page.DEFAULTS, "scheme": "w8a8-int8"}
    stream = chat.respond("hi", [], *args.values(), SimpleNamespace(session_hash="build"),
                          lambda value, desc=None, unit=None: bars.append((value, desc)))  # fmt: skip
    outputs = [next(stream) for _ in range(4)]
    release.set()
    outputs += list(stream)
    statuses = [status for _, _, status in outputs]
    assert any("Building the w8a8-int8 checkpoint: alpha search, layer 12 of 30" in s for s in statuses), statuses
    assert bars and bars[0][0] == (11, 30) and "alpha search" in bars[0][1]
    assert "Paris." in outputs[-1][0][-1]["content"]
