"""The page's long-lived state: one chat service, the start-up warm-up, and each browser session's run state.

No Gradio import here: test fixtures take ``service`` from this module to share the page's loaded engines."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

from serving.service import ChatService
from serving.startup import Warmup

service = ChatService()
warmup = Warmup()


@dataclass
class Session:
    """One browser tab: its cancel event while something generates, and the messages sent meanwhile."""

    cancel: threading.Event | None = None
    running: bool = False  # a chat loop is answering for this tab
    pending: deque[str] = field(default_factory=deque)  # messages sent while it answers, oldest first


_sessions: dict[str, Session] = {}
_lock = threading.RLock()


def session(request) -> Session:
    key = getattr(request, "session_hash", None) or "local"
    with _lock:
        return _sessions.setdefault(key, Session())


def lock() -> threading.RLock:
    """Guards every Session's running flag and pending queue."""
    return _lock


def new_cancel(request) -> threading.Event:
    s = session(request)
    s.cancel = threading.Event()
    return s.cancel


def stop(request) -> list[str]:
    """Ends what this tab runs (the chat answer, or every Compare column); returns the queued messages it dropped."""
    s = session(request)
    with _lock:
        dropped = list(s.pending)
        s.pending.clear()
    if s.cancel is not None:
        s.cancel.set()
    return dropped
