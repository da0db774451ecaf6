"""Load: 8 simultaneous conversations through gradio_client against the running app (CPU backend).

Each client asks its own question with greedy decoding; every answer must equal the answer to the same
question asked alone (no cross-talk), the queue must run the chats at the backends' capacity (one at a
time on CPU) and every client must finish within a bound.
"""

import asyncio
import threading
import time

import pytest

import app
from models.backend import Backend
from serving.service import BACKENDS, backend_availability, backend_class
from tests import appserver

pytestmark = pytest.mark.slow  # 8 conversations through a real server

QUESTIONS = [
    "What is the capital of France? Answer in one short sentence.",
    "What is the capital of Japan?",
    "Name three primary colors.",
    "What is 12 plus 7?",
    "Which planet is called the Red Planet?",
    "What do bees make?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
]
MAX_NEW = 12
BOUND_S = 120.0  # nobody waits longer than this, whatever the machine


@pytest.fixture(scope="module")
def server(embedded_folder):
    return appserver.shared()


def engine_limits(demo) -> dict[str, int | None]:
    """concurrency_limit of every event in the shared "engine" group, by function name."""
    return {fn.name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "engine"}


def test_chat_events_queue_at_the_backends_capacity(monkeypatch):
    capacity = min(backend_class(n).CAPACITY for n in BACKENDS if backend_availability(n)[0])
    assert capacity == backend_class("cpu").CAPACITY == 1  # the CPU engine's Generator runs one chat at a time
    limits = engine_limits(app.build_ui())
    assert {"run_chat", "chat_api", "compare"} <= set(limits), limits
    assert set(limits.values()) == {capacity}, limits
    # derived from the backends, not written down: an engine that could run 3 at once gets 3
    monkeypatch.setattr(Backend, "CAPACITY", 3)
    assert set(engine_limits(app.build_ui()).values()) == {3}


def processing_spans(job) -> tuple[float, float]:
    """(when the server started this job, when it finished), from the client's status messages."""
    start = end = None
    updates = job.communicator.updates
    while True:
        try:
            update = updates.get_nowait()
        except asyncio.QueueEmpty:
            break
        if getattr(update, "type", "") != "status" or update.time is None:
            continue
        code = update.code.name
        if code == "PROCESSING" and start is None:
            start = update.time.timestamp()
        if code == "FINISHED":
            end = update.time.timestamp()
    assert start is not None and end is not None, "no process_starts / process_completed messages seen"
    return start, end


def max_at_once(spans, slack: float) -> int:
    events = sorted([(start + slack, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_eight_simultaneous_conversations_get_their_own_answers(server):
    from gradio_client import Client

    alone, alone_s = {}, []
    solo = Client(server.url, verbose=False)
    for q in QUESTIONS:  # the reference: each question on its own
        t = time.perf_counter()
        alone[q] = solo.predict(q, max_new_tokens=MAX_NEW, api_name="/chat")
        alone_s.append(time.perf_counter() - t)
    solo.close()
    assert len(set(alone.values())) == len(QUESTIONS), alone  # distinct answers, so a swap would show

    clients = [Client(server.url, verbose=False) for _ in QUESTIONS]
    barrier = threading.Barrier(len(QUESTIONS))
    answers, latency, spans, errors = {}, {}, {}, {}

    def converse(client, q):
        try:
            barrier.wait(timeout=30)
            t = time.perf_counter()
            job = client.submit(q, max_new_tokens=MAX_NEW, api_name="/chat")
            answers[q] = job.result(timeout=BOUND_S)
            latency[q] = time.perf_counter() - t
            spans[q] = processing_spans(job)
        except Exception as e:  # noqa: BLE001 - reported below
            errors[q] = repr(e)

    pairs = zip(clients, QUESTIONS, strict=True)
    threads = [threading.Thread(target=converse, args=(c, q), daemon=True) for c, q in pairs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    deadline = t0 + BOUND_S + 30
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()))
    wall = time.perf_counter() - t0
    for c in clients:
        c.close()  # their heartbeat streams would hold the server's shutdown
    assert not any(t.is_alive() for t in threads), "a client waited past the bound"
    assert not errors, errors

    # no cross-talk: each client got exactly the answer its own question gets alone
    assert answers == alone

    # bounded waits: everyone done well within the bound, and the queue adds no more than the work itself
    assert max(latency.values()) < BOUND_S
    assert wall < 3 * sum(alone_s) + 20, (wall, alone_s)

    # the queue ran them at the backends' capacity (1 on CPU): never more processing at once (client clocks,
    # 50 ms of slack for one job's "completed" and the next one's "starts" arriving on different streams)
    assert max_at_once(spans.values(), slack=0.05) <= app.engine_capacity() == 1, sorted(spans.values())
    print(
        f"\nload: 8 clients, {MAX_NEW} new tokens each: alone {sum(alone_s):.1f} s in sequence "
        f"(max {max(alone_s):.2f} s); together {wall:.1f} s wall, latency max {max(latency.values()):.1f} s, "
        f"median {sorted(latency.values())[3]:.1f} s"
    )
