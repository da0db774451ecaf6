"""Tokenizer, chat template and history truncation."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.backend import Message, RequestError

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    ids: list[int]
    dropped_turns: int  # oldest user/assistant turns left out to fit the context


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    if not tok.chat_template:
        raise RequestError(f"the tokenizer in {folder} has no chat template")
    return tok


def clean_text(text: object, what: str) -> str:
    if not isinstance(text, str):
        raise RequestError(f"{what} must be text, got {type(text).__name__}")
    # Lone surrogates cannot be encoded; control characters other than tab/newline are noise.
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(c for c in text if c in "\t\n\r" or c >= " " and c != "\x7f")


def normalize_history(history: object) -> list[Message]:
    """Accept Gradio's list of {"role", "content"} messages; keep user/assistant text turns."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise RequestError("history must be a list of {'role', 'content'} messages")
    out = []
    for m in history:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            continue
        content = m.get("content")
        if isinstance(content, list):  # Gradio 6 may send [{"type": "text", "text": ...}]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if isinstance(content, str) and content.strip():
            out.append({"role": m["role"], "content": clean_text(content, "a history message")})
    return out


def split_turns(history: list[Message]) -> list[list[Message]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[Message]] = []
    for m in history:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def chat_messages(message: object, history: object = None, system: object = None) -> list[Message]:
    """The chat a backend is given: the system prompt (if any), the earlier turns, the new user message."""
    message = clean_text(message, "the message").strip()
    if not message:
        raise RequestError("the message is empty: type something to ask")
    system = clean_text(system or "", "the system prompt").strip()
    head = [{"role": "system", "content": system}] if system else []
    return head + normalize_history(history) + [{"role": "user", "content": message}]


def fit_chat(
    messages: list[Message], size: Callable[[list[Message]], int], max_tokens: int
) -> tuple[list[Message], int]:
    """The chat cut to ``size(chat) <= max_tokens`` by dropping its oldest turns whole: (chat, turns dropped).

    The system prompt and the new message are always kept; a message is never cut. If even they do not fit,
    says so instead.
    """
    if not messages or messages[-1].get("role") != "user":
        raise RequestError("a chat must end with the user's message")
    n_head = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    head, tail = messages[:n_head], messages[-1:]
    turns = split_turns(messages[n_head:-1])

    def chat(kept: list[list[Message]]) -> list[Message]:
        return head + [m for t in kept for m in t] + tail

    need = size(chat([]))
    if need > max_tokens:
        what = "the message and system prompt take" if head else "the message takes"
        raise RequestError(
            f"{what} {need} tokens but only {max_tokens} fit in the context with room for the answer: "
            "shorten it or lower max new tokens"
        )
    lo, hi = 0, len(turns)  # binary search on how many oldest turns to drop; dropping hi is known to fit
    while lo < hi:
        mid = (lo + hi) // 2
        if size(chat(turns[mid:])) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return chat(turns[lo:]), lo


def render_chat(tokenizer, messages: list[Message], max_tokens: int) -> Prompt:
    """The chat through the model's template as token ids that fit ``max_tokens`` (oldest turns dropped)."""

    def ids(chat: list[Message]) -> list[int]:
        out = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    kept, dropped = fit_chat(messages, lambda chat: len(ids(chat)), max_tokens)
    return Prompt(ids(kept), dropped_turns=dropped)


def build_prompt(
    tokenizer, message: str, history: object = None, system: str | None = None, max_tokens: int = 2048
) -> Prompt:
    """A chat turn rendered into token ids that fit ``max_tokens`` (``chat_messages`` + ``render_chat``)."""
    return render_chat(tokenizer, chat_messages(message, history, system), max_tokens)
