"""Remote engine: streams a chat from any OpenAI-compatible ``/v1/chat/completions`` server.

Configured process-wide by environment variables (``app.py --remote-url ...`` sets them; on a Space they
are the Space's variables and secrets):

- ``Q8CHAT_REMOTE_URL``: the server's base URL including ``/v1`` (as the ``openai`` client's ``base_url``),
  e.g. ``http://127.0.0.1:8000/v1``.
- ``Q8CHAT_REMOTE_MODEL``: the model name the server knows (else the model the request names).
- ``Q8CHAT_REMOTE_API_KEY_ENV``: the name of the variable that holds the API key (default
  ``Q8CHAT_REMOTE_API_KEY``); the key itself never appears on a command line or in a log.
- ``Q8CHAT_REMOTE_CONTEXT``: the remote model's context in tokens (default 8192), used to cut long chats.

The remote server applies its own chat template: the messages go through as they are, cut to the context by
dropping the oldest turns whole (``models.chat.fit_chat``, sized at a conservative 3 bytes per token: English
text runs ~4). The stream is read with the official ``openai`` client.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

import openai

from models.backend import Backend, Message, RequestError, SamplingParams, Stopwatch, TokenEvent
from models.chat import fit_chat

ENV_URL = "Q8CHAT_REMOTE_URL"
ENV_MODEL = "Q8CHAT_REMOTE_MODEL"
ENV_KEY_VAR = "Q8CHAT_REMOTE_API_KEY_ENV"
ENV_CONTEXT = "Q8CHAT_REMOTE_CONTEXT"
DEFAULT_KEY_VAR = "Q8CHAT_REMOTE_API_KEY"
REMOTE_SCHEME = "remote"  # the server runs whatever it serves: no scheme of ours applies
FINISH = {"stop": "eos", "length": "length"}
BYTES_PER_TOKEN = 3  # a conservative stand-in for the server's tokenizer when cutting long chats


def configure(url: str | None, model: str | None = None, api_key_env: str | None = None) -> None:
    """Point the remote backend at a server (process-wide); ``url=None`` turns it off."""
    for name, value in ((ENV_URL, url), (ENV_MODEL, model), (ENV_KEY_VAR, api_key_env)):
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    if url:
        validate_url(url)


def validate_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise RequestError(f"remote URL {url!r} must look like http://host:port/v1")
    return url.rstrip("/")


def remote_model() -> str | None:
    return os.environ.get(ENV_MODEL) or None


class RemoteEngine(Backend):
    name = "remote"

    def __init__(self, model: str, scheme: str = REMOTE_SCHEME, timeout_s: float = 120.0) -> None:
        url = os.environ.get(ENV_URL)
        if not url:
            raise RequestError("no remote server is configured: start q8chat with --remote-url http://host:port/v1")
        if scheme != REMOTE_SCHEME:
            raise RequestError(
                f"scheme {scheme!r} does not apply to a remote server (it serves what it serves); "
                f"use {REMOTE_SCHEME!r}"
            )
        self.url = validate_url(url)
        self.model = remote_model() or model
        key = os.environ.get(os.environ.get(ENV_KEY_VAR) or DEFAULT_KEY_VAR)
        self.client = openai.OpenAI(
            base_url=self.url, api_key=key or "unused", timeout=openai.Timeout(timeout_s, connect=10.0), max_retries=0
        )
        try:
            self._context = int(os.environ.get(ENV_CONTEXT, "8192"))
        except ValueError as e:
            raise RequestError(f"{ENV_CONTEXT} must be a whole number of tokens") from e

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        url = os.environ.get(ENV_URL)
        if not url:
            return False, "no remote server configured (start q8chat with --remote-url http://host:port/v1)"
        try:
            validate_url(url)
        except RequestError as e:
            return False, str(e)
        return True, ""

    @classmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        return (REMOTE_SCHEME,) if cls.availability()[0] else ()

    @property
    def scheme(self) -> str:
        return REMOTE_SCHEME

    @property
    def context_length(self) -> int:
        return self._context

    def request(self, messages: list[Message], params: SamplingParams) -> dict:
        """The create() arguments: OpenAI's own parameters, and the extras vLLM, llama.cpp and q8chat take
        (only when asked for)."""
        extra: dict = {}
        if params.top_k:
            extra["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
        args: dict = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            args["seed"] = params.seed
        if extra:
            args["extra_body"] = extra
        return args

    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        params.validate()
        room = (self.context_length - params.max_new_tokens) * BYTES_PER_TOKEN
        messages, dropped = fit_chat(messages, lambda chat: len(json.dumps(chat).encode()), room)
        return self._stream(messages, params, cancel, dropped)

    def _stream(self, messages, params: SamplingParams, cancel, dropped: int) -> Iterator[TokenEvent]:
        watch = Stopwatch(dropped_turns=dropped)
        reason, usage = "length", None
        try:
            stream = self.client.chat.completions.create(**self.request(messages, params))
            try:
                for chunk in stream:
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices or []:
                        text = choice.delta.content if choice.delta is not None else None
                        if text:
                            watch.token()
                            yield TokenEvent(text)
                        if choice.finish_reason:
                            reason = FINISH.get(choice.finish_reason, choice.finish_reason)
            finally:
                stream.close()
        except openai.APIStatusError as e:
            answer = f"answered {e.status_code}: {server_message(e)}"
            raise RequestError(f"the remote server at {self.url} {answer}") from None
        except openai.APIConnectionError as e:
            raise RequestError(f"cannot reach the remote server at {self.url}: {type(e).__name__}: {e}") from None
        except openai.APIError as e:  # a stream that breaks off or carries an error event
            raise RequestError(f"the remote server at {self.url} failed: {e.message}") from None
        generated = None
        if usage is not None and reason != "cancelled":
            watch.timings.prompt_tokens = usage.prompt_tokens or 0
            generated = usage.completion_tokens or watch.timings.generated_tokens
        yield TokenEvent("", finished=True, finish_reason=reason, timings=watch.finish(generated))


def server_message(e: openai.APIError) -> str:
    """The server's own words from an OpenAI-style error body, else the client's summary."""
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return err["message"]
        if isinstance(err, str):
            return err
    return e.message
