"""Tokenizer, chat template and history truncation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.backend import RequestError

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


def normalize_history(history: object) -> list[dict[str, str]]:
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


def split_turns(history: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Group messages into turns, each starting at a user message."""
    turns: list[list[dict[str, str]]] = []
    for m in history:
        if m["role"] == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def build_prompt(
    tokenizer, message: str, history: object = None, system: str | None = None, max_tokens: int = 2048
) -> Prompt:
    """Render the chat into token ids that fit ``max_tokens``.

    Keeps the system prompt and the new message whole; drops the oldest turns first. If even the
    system prompt plus the new message do not fit, says so instead of cutting a message.
    """
    message = clean_text(message, "the message").strip()
    if not message:
        raise RequestError("the message is empty: type something to ask")
    system = clean_text(system or "", "the system prompt").strip()
    head = [{"role": "system", "content": system}] if system else []
    tail = [{"role": "user", "content": message}]
    turns = split_turns(normalize_history(history))

    def render(kept: list[list[dict[str, str]]]) -> list[int]:
        messages = head + [m for t in kept for m in t] + tail
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    ids = render([])
    if len(ids) > max_tokens:
        raise RequestError(
            f"the message{' and system prompt together take' if system else ' takes'} {len(ids)} tokens but only "
            f"{max_tokens} fit "
            "in the context with room for the answer: shorten it or lower max new tokens"
        )
    # Find the most recent turns that fit: binary search on how many oldest turns to drop.
    lo, hi = 0, len(turns)  # dropping hi turns is known to fit
    while lo < hi:
        mid = (lo + hi) // 2
        if len(render(turns[mid:])) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return Prompt(render(turns[lo:]), dropped_turns=lo)
