"""The page in a real browser: Playwright (Python) driving Debian's chromium (installed by .ci/run).

Opens the page of a real server whose remote backend is a second q8chat server and checks what a person sees: the
question shows at once and the answer streams, a draft typed meanwhile survives and a message sent mid-answer is
queued, shown and answered; Stop; an empty seed is random; the Compare charts draw marks with a verdict line;
Compare's Stop ends every column; the conversation survives a reload; copy leaves the metrics line out; the phone
layout keeps the chat visible. Screenshots (desktop 1400x900, phone 390x844) go to artifacts/browser/. Requests to
anything but the loopback server are blocked, so the test never reaches the network.
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
CHARTS = ("#compare-bar-ttft_ms", "#compare-bar-tpot_ms", "#compare-bar-tokens_per_s", "#compare-timeline")
LONG = "Write a long story about a dragon."  # the embedded model writes to max new tokens (256) here


@pytest.fixture(scope="module")
def page_url(embedded_folder):
    remote = appserver.shared()
    front = appserver.shared(("--remote-url", remote.url + "v1"), env={"Q8CHAT_REMOTE_API_KEY": appserver.API_KEY})
    return front.url


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


def open_page(browser, url, width=1400, height=900):
    context = browser.new_context(
        viewport={"width": width, "height": height},
        accept_downloads=True,
        permissions=["clipboard-read", "clipboard-write"],
    )
    page = context.new_page()
    page.set_default_timeout(60_000)

    def only_loopback(route):
        host = urlparse(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", only_loopback)
    page.goto(url)
    page.locator("#message textarea").wait_for()
    return page


@pytest.fixture(scope="module")
def page(browser, page_url):
    page = open_page(browser, page_url)
    yield page
    page.context.close()


def shot(page, name, full_page=True):
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def chat_text(page) -> str:
    return page.locator("#chatbot").inner_text()


def send(page, text):
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def answers_done(page) -> int:
    return chat_text(page).count("TTFT")


def wait_answers(page, n, timeout=180):
    deadline = time.time() + timeout
    while answers_done(page) < n:
        assert time.time() < deadline, f"{n} answers not done in {timeout} s:\n{chat_text(page)[-800:]}"
        time.sleep(0.2)


def last_answer(page) -> str:
    return page.locator("#chatbot .bot").last.inner_text()


def test_page_opens_with_backends_examples_and_legends(page):
    shot(page, "01-open", full_page=False)
    assert page.locator("#backend").get_by_text("CPU", exact=True).is_visible()
    assert page.locator("#scheme input").input_value() == "bf16"
    assert page.get_by_text("Explain in two sentences why the sky is blue.").first.is_visible()  # an example
    assert "TTFT" in page.locator("#metrics-legend").inner_text()
    assert "w8a8-int8" in page.locator("#schemes-legend").inner_text()
    assert "/v1" in page.locator("#api-note").inner_text()
    page.locator("#sampling").get_by_text("Sampling").click()
    assert page.locator("#seed textarea, #seed input").first.input_value() == ""  # opening the panel keeps it empty


def test_unavailable_gpu_is_shown_disabled_with_its_reason(page):
    if backend_availability("gpu")[0]:
        pytest.skip("this machine has a usable GPU")
    option = page.locator("#backend label").filter(has_text="GPU (unavailable)")
    assert option.evaluate("e => getComputedStyle(e).pointerEvents") == "none"
    assert float(option.evaluate("e => getComputedStyle(e).opacity")) < 0.6
    assert "GPU unavailable" in page.locator("#backend-notes").inner_text()


def test_answer_streams_the_draft_survives_and_a_mid_answer_message_is_queued(page):
    n = answers_done(page)
    send(page, LONG)
    page.locator("#chatbot").get_by_text(LONG).wait_for(timeout=5_000)  # the question shows at once
    lengths = []
    deadline = time.time() + 120
    while time.time() < deadline and len(set(lengths)) < 4:
        lengths.append(len(chat_text(page)))
        time.sleep(0.1)
    assert len(set(lengths)) >= 4, "the answer did not grow in steps (no streaming seen)"
    assert page.locator("#send").inner_text() == "Queue"  # the buttons say something is generating
    send(page, "What is the capital of France? Answer in one short sentence.")
    page.locator("#status").get_by_text("Queued (1)", exact=False).wait_for(timeout=10_000)
    page.locator("#message textarea").fill("a draft I am still typing")
    shot(page, "02-streaming-queued", full_page=False)
    wait_answers(page, n + 2, timeout=240)
    assert page.locator("#message textarea").input_value() == "a draft I am still typing"
    assert "Paris" in last_answer(page)
    page.wait_for_function("document.querySelector('#send').innerText.trim() === 'Send'")
    shot(page, "03-queued-answered", full_page=False)
    page.locator("#message textarea").fill("")


def test_stop_ends_the_answer(page):
    n, before = answers_done(page), len(chat_text(page))
    send(page, LONG)
    page.wait_for_function("document.querySelector('#send').innerText.trim() === 'Queue'", timeout=60_000)
    page.wait_for_function(  # the answer has started streaming
        "(n) => document.querySelector('#chatbot').innerText.length > n", arg=before + len(LONG) + 40, timeout=60_000
    )
    page.locator("#stop").click()
    wait_answers(page, n + 1, timeout=60)
    assert "stopped" in last_answer(page).splitlines()[-1]


def test_copy_leaves_the_metrics_line_out(page):
    page.locator("#chatbot .bot").last.hover()
    page.locator("#chatbot button[aria-label*='opy']").last.click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.strip() and "TTFT" not in copied and copied.strip() in last_answer(page)


def test_empty_seed_gives_different_answers_at_temperature_one(page):
    page.locator("#temperature input[type=number]").fill("1")
    page.locator("#temperature input[type=number]").press("Enter")
    seed = page.locator("#seed textarea, #seed input").first
    assert seed.input_value() == ""
    texts = []
    for _ in range(2):
        n = answers_done(page)
        send(page, "Write one sentence about a cat.")
        wait_answers(page, n + 1)
        texts.append(last_answer(page).split("TTFT")[0].strip())
    assert texts[0] != texts[1], texts
    page.locator("#temperature input[type=number]").fill("0")
    page.locator("#temperature input[type=number]").press("Enter")


def test_the_conversation_survives_a_reload(page):
    before = chat_text(page)
    assert "Write one sentence about a cat." in before
    page.reload()
    page.locator("#message textarea").wait_for()
    page.locator("#chatbot").get_by_text("Write one sentence about a cat.").first.wait_for(timeout=10_000)
    assert answers_done(page) == before.count("TTFT")


def test_switching_backend_switches_the_scheme_and_answers_remotely(page):
    page.locator("#backend").get_by_text("REMOTE", exact=True).click()
    page.wait_for_function("document.querySelector('#scheme input').value === 'remote'")
    n = answers_done(page)
    send(page, "What is the capital of France? Answer in one short sentence.")
    wait_answers(page, n + 1)
    assert "REMOTE · remote" in last_answer(page) and last_answer(page).split("TTFT")[0].strip()
    shot(page, "04-remote", full_page=False)
    page.locator("#backend").get_by_text("CPU", exact=True).click()
    page.wait_for_function("document.querySelector('#scheme input').value === 'bf16'")


def drawn_marks(page, chart) -> list[str]:
    """The fill (bars) or stroke (points) colors of the marks a chart drew: none means an empty chart."""
    return page.evaluate(
        """(sel) => [...document.querySelectorAll(sel + ' g.role-mark path')]
               .filter(p => !p.closest('.role-legend') && !p.closest('.role-axis') && (p.getAttribute('d') || ''))
               .map(p => { const f = p.getAttribute('fill'), s = p.getAttribute('stroke');
                           return f && f !== 'transparent' && f !== 'none' ? f : s; })
               .filter(c => c && c !== 'transparent' && c !== 'none')""",
        chart,
    )


def test_compare_draws_every_chart_with_a_verdict_and_exports_csv(page, tmp_path):
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-run").wait_for()
    assert page.locator("#compare-isa").get_by_text("INT8 instructions", exact=False).is_visible()
    assert page.locator("#compare-recorded").get_by_text("Recorded, not live", exact=False).is_visible()
    page.locator("#compare-prompt textarea").fill("What is the capital of France? Answer in one short sentence.")
    page.locator("#compare-run").click()
    page.locator("#compare-verdict").get_by_text("Run 1:", exact=False).wait_for(timeout=300_000)
    verdict = page.locator("#compare-verdict").inner_text()
    assert "× faster than" in verdict and "tokens/s" in verdict and "TTFT" in verdict
    assert "Paris" in page.locator("#compare-answer-cpu").inner_text()
    intel = [n for n in ("openvino", "ipex") if backend_availability(n)[0]]
    live = ["cpu", *intel, "remote"]
    for chart in CHARTS:
        page.wait_for_function(
            "(sel) => document.querySelectorAll(sel + ' g.role-mark path').length > 0", arg=chart, timeout=15_000
        )
        marks = drawn_marks(page, chart)
        assert len(marks) >= len(live), (chart, marks)  # one colored mark per engine at least
    assert "CPU bf16" in page.locator("#compare-bar-tokens_per_s").inner_text()  # bars name backend and scheme
    shot(page, "05-compare-results")
    with page.expect_download() as download:
        page.locator("#compare-csv").click()
    path = tmp_path / "measurements.csv"
    download.value.save_as(path)
    rows = list(csv.DictReader(path.open()))
    assert [r["backend"] for r in rows] == [backend_label(n) for n in live]
    assert all(float(r["ttft_ms"]) > 0 and float(r["tokens_per_s"]) > 0 for r in rows)
    # a second run with another scheme accumulates: its bars draw too (new labels, new colors)
    page.locator("#compare-scheme-cpu input").click()
    page.get_by_role("option", name="w8a16-int8").click()
    page.wait_for_function("document.querySelector('#compare-scheme-cpu input').value === 'w8a16-int8'")
    page.locator("#compare-run").click()
    page.locator("#compare-verdict").get_by_text("Run 2:", exact=False).wait_for(timeout=300_000)
    for chart in CHARTS:
        assert len(drawn_marks(page, chart)) >= 2 * len(live), chart
    assert "#2 CPU w8a16-int8" in page.locator("#compare-bar-tokens_per_s").inner_text()
    shot(page, "06-compare-two-runs")


def test_compare_stop_ends_every_column(page):
    run = 1 + page.locator("#compare-verdict").inner_text().count("Run ")
    page.locator("#compare-prompt textarea").fill(LONG)
    page.locator("#compare-max-new input[type=number]").fill("512")
    page.locator("#compare-max-new input[type=number]").press("Enter")
    page.locator("#compare-run").click()
    page.wait_for_function("document.querySelector('#compare-answer-cpu').innerText.length > 40", timeout=120_000)
    page.locator("#compare-stop").click()
    page.locator("#compare-verdict").get_by_text(f"Run {run}:", exact=False).wait_for(timeout=60_000)
    assert "stopped" in page.locator("#compare-answer-cpu").inner_text()
    for name in [n for n in ("openvino", "ipex") if backend_availability(n)[0]] + ["remote"]:
        assert "stopped before it started" in page.locator(f"#compare-answer-{name}").inner_text()
    shot(page, "07-compare-stopped")


def test_phone_layout_keeps_the_chat_visible(browser, page_url):
    phone = open_page(browser, page_url, 390, 844)
    try:
        phone.wait_for_function("!document.querySelector('.sidebar.open')", timeout=10_000)
        box = phone.locator("#message textarea").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["width"] > 150
        chatbot = phone.locator("#chatbot").bounding_box()
        assert chatbot["width"] > 300
        shot(phone, "08-phone-chat", full_page=False)
        phone.get_by_role("tab", name="Compare").click()
        shot(phone, "09-phone-compare")
    finally:
        phone.context.close()
