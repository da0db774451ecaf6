"""Remote engine: streams a chat from any OpenAI-compatible ``/v1/chat/completions`` server.

Configured process-wide by environment variables (``app.py --remote-url ...`` sets them; on a Space they
are the Space's variables and secrets):

- ``Q8CHAT_REMOTE_URL``: the server's base URL including ``/v1`` (as the ``openai`` client's ``base_url``),
  e.g. ``http://127.0.0.1:8000/v1``.
- ``Q8CHAT_REMOTE_MODEL``: the model name the server knows (else the model the request names).
- ``Q8CHAT_REMOTE_API_KEY_ENV``: the name of the variable that holds the API key (default
  ``Q8CHAT_REMOTE_API_KEY``); the key itself never appears on a command line or in a log.
- ``Q8CHAT_REMOTE_CONTEXT``: the remote model's context in tokens (default 8192), used to cut long chats.

The remote server applies its own chat template, so the "prompt" the service renders for this engine is
the chat itself: ``MessageCodec`` packs the messages (JSON, UTF-8, three bytes per id) into the id list
that the ``Backend`` interface carries and unpacks them here. Its length, bytes / 3, is a conservative
stand-in for the token count (English text runs ~4 bytes per token), so history truncation still works.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx

from models.backend import Backend, RequestError, SamplingParams, Timings, TokenEvent

ENV_URL = "Q8CHAT_REMOTE_URL"
ENV_MODEL = "Q8CHAT_REMOTE_MODEL"
ENV_KEY_VAR = "Q8CHAT_REMOTE_API_KEY_ENV"
ENV_CONTEXT = "Q8CHAT_REMOTE_CONTEXT"
DEFAULT_KEY_VAR = "Q8CHAT_REMOTE_API_KEY"
REMOTE_SCHEMES = ("remote",)
FINISH = {"stop": "eos", "length": "length"}


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


class MessageCodec:
    """Stands in for a tokenizer: 'renders' a chat into ids that carry the messages themselves."""

    chat_template = "remote: the server applies its own template"
    eos_token_id = None

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True, return_dict=False):
        data = json.dumps(list(messages), ensure_ascii=False).encode("utf-8")
        data += b" " * (-len(data) % 3)  # JSON ignores trailing blanks
        return [int.from_bytes(data[i : i + 3], "big") for i in range(0, len(data), 3)]

    def decode(self, ids, skip_special_tokens=True) -> str:
        return b"".join(int(i).to_bytes(3, "big") for i in ids).decode("utf-8")

    def messages(self, ids: list[int]) -> list[dict[str, str]]:
        try:
            messages = json.loads(self.decode(ids))
        except (ValueError, OverflowError) as e:
            raise RequestError("the remote backend got a prompt that is not a packed chat") from e
        if not isinstance(messages, list):
            raise RequestError("the remote backend got a prompt that is not a packed chat")
        return messages


class RemoteEngine(Backend):
    name = "remote"
    SCHEMES = REMOTE_SCHEMES

    def __init__(self, model: str, scheme: str = "remote", timeout_s: float = 120.0) -> None:
        url = os.environ.get(ENV_URL)
        if not url:
            raise RequestError("no remote server is configured: start q8chat with --remote-url http://host:port/v1")
        if scheme not in REMOTE_SCHEMES:
            raise RequestError(
                f"scheme {scheme!r} does not apply to a remote server (it serves what it serves); use 'remote'"
            )
        self.url = validate_url(url)
        self.model = remote_model() or model
        self.tokenizer = MessageCodec()
        self.timeout = httpx.Timeout(timeout_s, connect=10.0)
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

    @property
    def scheme(self) -> str:
        return "remote"

    @property
    def context_length(self) -> int:
        return self._context

    def headers(self) -> dict[str, str]:
        key = os.environ.get(os.environ.get(ENV_KEY_VAR) or DEFAULT_KEY_VAR)
        headers = {"Accept": "text/event-stream"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def body(self, messages: list[dict[str, str]], params: SamplingParams) -> dict:
        body: dict = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        # not OpenAI's own parameters, but vLLM, llama.cpp and q8chat take them; send them only when asked for
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        return body

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        params.validate()
        messages = self.tokenizer.messages(prompt_ids)
        return self._stream(messages, params, cancel)

    def _stream(self, messages, params: SamplingParams, cancel: threading.Event | None) -> Iterator[TokenEvent]:
        timings = Timings()
        start = time.perf_counter()
        first = last = start
        chunks, reason, usage = 0, "length", None
        endpoint = f"{self.url}/chat/completions"
        try:
            with (
                httpx.Client(timeout=self.timeout) as client,
                client.stream("POST", endpoint, json=self.body(messages, params), headers=self.headers()) as response,
            ):
                if response.status_code >= 400:
                    response.read()
                    raise RequestError(
                        f"the remote server at {self.url} answered {response.status_code}: {error_message(response)}"
                    )
                for data in sse_data(response.iter_lines()):
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    if data == "[DONE]":
                        break
                    chunk = parse_chunk(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content") or ""
                        if text:
                            last = time.perf_counter()
                            if chunks == 0:
                                first = last
                                timings.ttft_ms = (first - start) * 1000
                            chunks += 1
                            yield TokenEvent(text)
                        if choice.get("finish_reason"):
                            reason = FINISH.get(choice["finish_reason"], choice["finish_reason"])
        except httpx.HTTPError as e:
            raise RequestError(f"cannot reach the remote server at {self.url}: {type(e).__name__}: {e}") from None
        n = chunks
        if usage and reason != "cancelled":
            timings.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            n = int(usage.get("completion_tokens") or chunks)
        timings.generated_tokens = n
        timings.tpot_ms = (last - first) * 1000 / (n - 1) if n > 1 else 0.0
        timings.total_ms = (time.perf_counter() - start) * 1000
        yield TokenEvent("", finished=True, finish_reason=reason, timings=timings)


def sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream (one JSON object per event here)."""
    for line in lines:
        if line.startswith("data:"):
            yield line[5:].strip()


def parse_chunk(data: str) -> dict:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise RequestError(f"the remote server sent something that is not JSON: {data[:200]!r}") from None
    if not isinstance(chunk, dict):
        raise RequestError(f"the remote server sent an unexpected event: {data[:200]!r}")
    if chunk.get("error"):
        err = chunk["error"]
        raise RequestError(f"the remote server says: {err.get('message') if isinstance(err, dict) else err}")
    return chunk


def error_message(response: httpx.Response) -> str:
    try:
        err = response.json().get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    except (ValueError, AttributeError):
        pass
    return response.text[:300] or response.reason_phrase
