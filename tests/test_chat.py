"""Chat template rendering and history truncation."""

import pytest

from models.backend import RequestError
from models.chat import build_prompt, clean_text, load_tokenizer, normalize_history


@pytest.fixture(scope="module")
def tok(embedded_folder):
    return load_tokenizer(embedded_folder)


def turns(n):
    history = []
    for i in range(n):
        history += [
            {"role": "user", "content": f"question {i} " + "word " * 30},
            {"role": "assistant", "content": f"answer {i} " + "word " * 30},
        ]
    return history


def test_prompt_uses_the_chat_template(tok):
    p = build_prompt(tok, "Hello?", system="Be brief.")
    text = tok.decode(p.ids)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert text.endswith("<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\n")
    assert p.dropped_turns == 0


def test_history_fits_untouched_when_short(tok):
    p = build_prompt(tok, "next", turns(3), max_tokens=2048)
    text = tok.decode(p.ids)
    assert p.dropped_turns == 0 and "question 0" in text and "answer 2" in text


def test_oldest_turns_are_dropped_first_and_system_prompt_kept(tok):
    full = len(build_prompt(tok, "next", turns(6), system="SYS").ids)
    p = build_prompt(tok, "next", turns(6), system="SYS", max_tokens=full - 20)
    text = tok.decode(p.ids)
    assert len(p.ids) <= full - 20
    assert p.dropped_turns == 1
    assert "question 0" not in text and "answer 0" not in text
    assert "question 1" in text and "SYS" in text and "next" in text


def test_messages_are_never_cut_in_half(tok):
    for budget in (150, 200, 260, 330):
        p = build_prompt(tok, "next", turns(6), max_tokens=budget)
        text = tok.decode(p.ids)
        assert len(p.ids) <= budget
        for i in range(6):  # a turn is either fully there or fully gone
            assert (f"question {i} " + "word " * 30).strip() in text or f"question {i}" not in text


def test_message_too_long_for_the_context_is_refused(tok):
    with pytest.raises(RequestError, match="tokens but only 50 fit"):
        build_prompt(tok, "word " * 200, max_tokens=50)


@pytest.mark.parametrize("message", ["", "   ", "\n\t"])
def test_empty_message_is_refused(tok, message):
    with pytest.raises(RequestError, match="empty"):
        build_prompt(tok, message)


def test_gradio_content_lists_and_junk_entries_are_normalized():
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": "hello"},
        {"role": "tool", "content": "ignored"},
        "garbage",
        {"role": "user", "content": "  "},
    ]
    assert normalize_history(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RequestError):
        normalize_history("not a list")


def test_control_characters_and_lone_surrogates_are_cleaned():
    assert clean_text("a\x00b\x1bc\nd\ud800", "x") == "abc\nd?"
    with pytest.raises(RequestError, match="must be text"):
        clean_text(42, "the message")
