"""Scheme switches on an Intel backend, as the page makes them: at most one worker process per backend, and the
memory they hold stays that of one model each (five switches used to leave five ~1.1 GB workers alive)."""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest

from models.backend import SamplingParams
from serving.service import ChatService, ChatSettings, backend_availability

GIB = 1024**3
SHORT = SamplingParams(max_new_tokens=4)


def workers() -> dict[str, list[psutil.Process]]:
    """This process's Intel worker processes, by runtime."""
    found: dict[str, list[psutil.Process]] = {}
    for child in psutil.Process().children():  # workers only: a worker's own forks share its command line
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "cpu_backend.intel_worker" in cmd:
            found.setdefault(cmd[cmd.index("--runtime") + 1], []).append(child)
    return found


def rss(procs) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def test_ten_scheme_switches_leave_one_worker_per_backend():
    for runtime in ("openvino", "ipex"):
        ok, reason = backend_availability(runtime)
        if not ok:
            if os.environ.get("Q8CHAT_REQUIRE_INTEL"):
                pytest.fail(f"{runtime}: {reason}")
            pytest.skip(reason)
    service = ChatService()
    peak_one = 0
    most: dict[str, int] = {}  # the most workers of one runtime alive at any moment, also while a new one loads
    done = threading.Event()

    def watch():
        while not done.is_set():
            for runtime, procs in workers().items():
                most[runtime] = max(most.get(runtime, 0), len(procs))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for i in range(10):
            scheme = ("bf16", "w8a16-int8")[i % 2]
            settings = ChatSettings(backend="openvino", scheme=scheme, sampling=SHORT)
            updates = list(service.chat("Say hi.", [], settings))
            assert updates[-1].done and updates[-1].scheme == scheme
            alive = workers()
            assert len(alive.get("openvino", [])) == 1, f"switch {i + 1}: {alive}"
            peak_one = max(peak_one, rss(alive["openvino"]))
        list(service.chat("Say hi.", [], ChatSettings(backend="ipex", scheme="bf16", sampling=SHORT)))
        alive = workers()
        assert {k: len(v) for k, v in alive.items()} == {"openvino": 1, "ipex": 1}
        total = rss(p for procs in alive.values() for p in procs)
        assert peak_one < 2 * GIB and total < 4 * GIB, (peak_one / GIB, total / GIB)
        assert most == {"openvino": 1, "ipex": 1}, most
    finally:
        done.set()
        watcher.join()
        for backend in ("openvino", "ipex"):
            engine = service._engines.get(backend)
            if engine is not None:
                engine.close()
    assert not workers()  # closed engines leave no process behind
