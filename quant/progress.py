"""How far the running checkpoint build has got, for whoever shows it (the page's progress bar).

The pipeline reports each stage layer by layer; a process builds one checkpoint at a time (the service's load
lock), so one slot is enough. Reading it never blocks the build.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildProgress:
    stage: str  # "activation statistics", "alpha search", "quantizing"
    done: int  # layers finished in this stage
    total: int


_lock = threading.Lock()
_current: BuildProgress | None = None


def report(stage: str, done: int, total: int) -> None:
    global _current
    with _lock:
        _current = BuildProgress(stage, done, total)


def end() -> None:
    global _current
    with _lock:
        _current = None


def current() -> BuildProgress | None:
    with _lock:
        return _current
