"""The page in a real browser: Playwright (Python) driving Debian's chromium (installed by .ci/run).

Opens the page of a real server whose remote backend is a second q8chat server, sends a message and
watches the answer stream in, presses Stop, switches backend and scheme, runs the compare view and
exports its CSV. Screenshots of each step go to artifacts/browser/. Requests to anything but the
loopback server are blocked, so the test never reaches the network.
"""

import csv
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from serving.service import backend_availability, backend_label
from tests import appserver

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "browser"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page_url(embedded_folder):
    remote = appserver.shared()
    front = appserver.shared(("--remote-url", remote.url + "v1"), env={"Q8CHAT_REMOTE_API_KEY": appserver.API_KEY})
    return front.url


@pytest.fixture(scope="module")
def page(page_url):
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)

        def only_loopback(route):
            host = urlparse(route.request.url).hostname
            if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
                route.continue_()
            else:
                route.abort()

        page.route("**/*", only_loopback)
        page.goto(page_url)
        page.locator("#message textarea").wait_for()
        yield page
        context.close()
        browser.close()


def shot(page, name):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def chat_text(page) -> str:
    return page.locator("#chatbot").inner_text()


def send(page, text):
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def test_page_opens_with_backends_and_reasons(page):
    shot(page, "01-open")
    assert page.locator("#backend").get_by_text("CPU", exact=True).is_visible()
    assert "GPU (unavailable)" in page.locator("#backend").inner_text() or os.environ.get("CUDA_VISIBLE_DEVICES")
    assert page.locator("#scheme input").input_value() == "bf16"


def test_message_streams_and_stop_ends_it(page):
    send(page, "Count from one to two hundred in words, one number per line.")
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline and len(set(lengths)) < 4:
        lengths.append(len(chat_text(page)))
        time.sleep(0.1)
    assert len(set(lengths)) >= 4, "the answer did not grow in steps (no streaming seen)"
    assert lengths == sorted(lengths)
    shot(page, "02-streaming")
    page.locator("#stop").click()
    page.get_by_text("stopped", exact=False).first.wait_for(timeout=60_000)
    shot(page, "03-stopped")
    assert "TTFT" in chat_text(page) and "ms/token" in chat_text(page)


def test_switching_backend_switches_the_scheme_and_answers_remotely(page):
    page.locator("#backend").get_by_text("REMOTE", exact=True).click()
    page.wait_for_function("document.querySelector('#scheme input').value === 'remote'")
    send(page, "What is the capital of France? Answer in one short sentence.")
    page.locator("#chatbot").get_by_text("REMOTE · remote", exact=False).wait_for(timeout=120_000)
    shot(page, "04-remote")
    answer = chat_text(page).split("What is the capital of France? Answer in one short sentence.")[-1]
    assert answer.split("TTFT")[0].strip()  # an answer, with the earlier turns sent along as history
    page.locator("#backend").get_by_text("CPU", exact=True).click()
    page.wait_for_function("document.querySelector('#scheme input').value === 'bf16'")


def test_unavailable_gpu_cannot_be_chosen(page):
    if "GPU (unavailable)" not in page.locator("#backend").inner_text():
        pytest.skip("this machine has a usable GPU")
    page.locator("#backend").get_by_text("GPU (unavailable)").click()
    page.get_by_text("GPU is not available", exact=False).first.wait_for()
    page.wait_for_function("document.querySelector('#backend input[value=cpu]').checked")
    shot(page, "05-gpu-unavailable")


def test_compare_view_runs_plots_and_exports_csv(page, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-run").wait_for()
    shot(page, "06-compare-open")
    page.locator("#compare-prompt textarea").fill("What is the capital of France? Answer in one short sentence.")
    page.locator("#compare-run").click()
    page.locator("#compare-answer-remote").get_by_text("TTFT", exact=False).wait_for(timeout=180_000)
    cpu = page.locator("#compare-answer-cpu").inner_text()
    assert "Paris" in cpu and "CPU" in cpu
    assert "Paris" in page.locator("#compare-answer-remote").inner_text()
    assert "unavailable" in page.locator("#compare-answer-gpu").inner_text()
    for plot in ("#compare-bar-ttft_ms", "#compare-bar-tpot_ms", "#compare-bar-tokens_per_s", "#compare-timeline"):
        page.locator(f"{plot} canvas, {plot} svg").first.wait_for()
    shot(page, "07-compare-results")
    with page.expect_download() as download:
        page.locator("#compare-csv").click()
    path = tmp_path / "measurements.csv"
    download.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    intel = [backend_label(n) for n in ("openvino", "ipex") if backend_availability(n)[0]]  # when their venvs exist
    assert [r["backend"] for r in rows] == ["CPU", *intel, "REMOTE"]
    assert all(float(r["ttft_ms"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    assert rows[0]["prompt"] == "What is the capital of France? Answer in one short sentence."
