"""One way for tests to call the page's chat handler (``ui.chat.respond``) as a browser tab would."""

from __future__ import annotations

from types import SimpleNamespace

from ui import chat

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
    """The handler's outputs, streamed: (chat, textbox, status) tuples."""
    a = {**DEFAULTS, **overrides}
    return chat.respond(message, history or [], *(a[k] for k in DEFAULTS), SimpleNamespace(session_hash=session))


def ask(message, history=None, session="s1", **overrides):
    """The last (chat, textbox, status) of one answer."""
    return list(respond(message, history, session, **overrides))[-1]
