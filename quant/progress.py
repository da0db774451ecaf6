"""How far the running checkpoint build has got, for whoever shows it (the page's progress bar).

The pipeline reports each stage layer by layer; a process builds one checkpoint at a time (the service's load
lock), so one slot is enough. Reading it never blocks the build.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildProgress:
    stage: str  # "activation statistics", "alpha search", "quantizing"
    done: int
    total: int
    started: float  # time.monotonic() when the build began

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


_lock = threading.Lock()
_current: BuildProgress | None = None
_started: float | None = None


def begin() -> None:
    global _current, _started
    with _lock:
        _current, _started = None, time.monotonic()


def report(stage: str, done: int, total: int) -> None:
    global _current
    with _lock:
        _current = BuildProgress(stage, done, total, _started if _started is not None else time.monotonic())


def end() -> None:
    global _current, _started
    with _lock:
        _current, _started = None, None


def current() -> BuildProgress | None:
    with _lock:
        return _current
