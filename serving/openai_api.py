"""The app's OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed or not).

Mounted beside the Gradio page (see ``serving.server.create_app``). It goes through the same ``ChatService`` as the
page, so the same engines, validation and truncation apply. Errors are OpenAI-style JSON bodies,
``{"error": {"message", "type", "param", "code"}}``, with 400 (bad request), 401 (wrong API key),
404 (unknown model), 503 (model still loading, backend unavailable) or 500; never a traceback.

Choosing the engine: the ``model`` field is a model id from ``/v1/models``: ``smollm2-135m`` runs the
default backend and scheme (CPU, bf16), ``smollm2-135m@gpu:w8a8-fp8`` names both. The extra body fields
``backend`` and ``scheme`` (``extra_body=`` in the ``openai`` client) do the same. ``top_k`` and
``repetition_penalty`` are accepted as extra fields too, as vLLM does.

Set ``Q8CHAT_API_KEY`` to require ``Authorization: Bearer <key>`` on these routes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from models.backend import SamplingParams
from models.registry import DEFAULT_MODEL, ModelNotFoundError
from serving.service import (
    BACKENDS,
    ChatService,
    ChatSettings,
    ChatUpdate,
    backend_availability,
    backend_schemes,
    default_backend,
)
from serving.startup import NotReadyError, Warmup

log = logging.getLogger("q8chat")

CREATED = int(time.time())
FINISH = {"eos": "stop", "length": "length", "cancelled": "stop", None: "stop"}
KNOWN_FIELDS = {
    "model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "repetition_penalty", "seed", "n", "stop", "frequency_penalty", "presence_penalty",
    "backend", "scheme", "user", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "logit_bias", "metadata", "store", "service_tier", "reasoning_effort",
}  # fmt: skip


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        code = {401: "invalid_api_key", 404: "model_not_found", 503: "unavailable"}.get(self.status)
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}
        return JSONResponse(body, status_code=self.status)


def error_for(e: Exception) -> APIError:
    """Every failure as an APIError whose message tells the caller what to do."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, NotReadyError):
        return APIError(503, str(e), "server_error")
    if isinstance(e, ModelNotFoundError):
        return APIError(404, str(e), param="model")
    if isinstance(e, ValueError):  # RequestError and the other validation errors speak to the user
        return APIError(400, str(e))
    log.exception("API request failed")
    return APIError(500, f"q8chat failed inside ({type(e).__name__}); the server log has the details", "server_error")


def model_ids(remote_model: str | None = None) -> list[tuple[str, str, str, str]]:
    """(id, model, backend, scheme) for what this server can run now."""
    ids = [(DEFAULT_MODEL, DEFAULT_MODEL, default_backend(), "bf16")]
    for backend in BACKENDS:
        if not backend_availability(backend)[0]:
            continue
        model = (remote_model or DEFAULT_MODEL) if backend == "remote" else DEFAULT_MODEL
        ids += [(f"{model}@{backend}:{scheme}", model, backend, scheme) for scheme in backend_schemes(backend)]
    return ids


def parse_model(model: object, backend: object, scheme: object) -> tuple[str, str, str]:
    if not isinstance(model, str) or not model.strip():
        raise APIError(400, "'model' is required: GET /v1/models lists the ids", param="model")
    name, _, target = model.strip().partition("@")
    if target:
        b, _, s = target.partition(":")
        backend, scheme = backend or b, scheme or s or None
    if backend is not None and backend not in BACKENDS:
        raise APIError(400, f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}", param="backend")
    backend = backend or default_backend()
    if scheme is not None and not isinstance(scheme, str):
        raise APIError(400, "'scheme' must be a string", param="scheme")
    ok, reason = backend_availability(backend)
    if not ok:
        raise APIError(503, f"the {backend.upper()} backend is not available: {reason}", "server_error")
    schemes = backend_schemes(backend)
    scheme = scheme or schemes[0]
    if scheme not in schemes:
        raise APIError(400, f"scheme {scheme!r} is not available on {backend}; choose one of {', '.join(schemes)}")
    from remote_backend.engine import remote_model

    known = {m for _, m, _, _ in model_ids(remote_model())}
    if name not in known:
        raise APIError(404, f"model {name!r} not found: GET /v1/models lists the ids this server runs", param="model")
    return name, backend, scheme


def text_content(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where}: 'content' must be a string or a list of text parts", param="messages")


def parse_messages(messages: object) -> tuple[str, list[dict[str, str]], str]:
    """(system prompt, history, new user message) from an OpenAI message list."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    system, history = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        if role in ("system", "developer"):
            system.append(text_content(m.get("content"), f"messages[{i}]"))
        elif role in ("user", "assistant"):
            history.append({"role": role, "content": text_content(m.get("content"), f"messages[{i}]")})
        else:
            supported = "system, user, assistant"
            raise APIError(400, f"messages[{i}]: role {role!r} is not supported ({supported})", param="messages")
    if not history or history[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return "\n\n".join(s for s in system if s.strip()), history[:-1], history[-1]["content"]


def parse_request(body: object) -> tuple[str, ChatSettings, str, list[dict[str, str]], bool, bool]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise APIError(400, f"unknown field(s): {', '.join(unknown)}", param=unknown[0])
    if body.get("n") not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    if body.get("stop") not in (None, [], ""):
        raise APIError(400, "'stop' sequences are not supported; leave it out", param="stop")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if body.get(penalty) not in (None, 0, 0.0):
            raise APIError(400, f"{penalty} is not supported; use repetition_penalty", param=penalty)
    for unsupported in ("tools", "logprobs", "response_format", "logit_bias"):
        if body.get(unsupported) not in (None, False, [], {}, {"type": "text"}):
            raise APIError(400, f"{unsupported} is not supported by q8chat", param=unsupported)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    model, backend, scheme = parse_model(body.get("model"), body.get("backend"), body.get("scheme"))
    system, history, message = parse_messages(body.get("messages"))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))

    def given(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    params = SamplingParams(
        max_new_tokens=256 if max_tokens is None else max_tokens,
        temperature=given("temperature", 1.0),
        top_p=given("top_p", 1.0),
        top_k=given("top_k", 0),
        repetition_penalty=given("repetition_penalty", 1.0),
        seed=body.get("seed"),
    )
    params.validate()  # RequestError -> 400 with the parameter's own message
    settings = ChatSettings(backend, model, scheme, system, params)
    return model, settings, message, history, stream, bool(options.get("include_usage"))


def run_in_thread(work: Callable[[Callable[[Any], None]], None]) -> tuple[asyncio.Queue, threading.Thread]:
    """Run blocking ``work(emit)`` in its own thread; what it emits (then None, or the exception) arrives
    on an asyncio queue. The thread always runs to the end, so the engine's lock is always released."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def main() -> None:
        try:
            work(emit)
            emit(None)
        except BaseException as e:  # noqa: BLE001 - handed to the request, which turns it into an error body
            emit(e)

    thread = threading.Thread(target=main, name="q8chat-api", daemon=True)
    thread.start()
    return queue, thread


def usage_of(update: ChatUpdate | None) -> dict[str, Any]:
    t = update.timings if update else None
    prompt, completion, cached = (t.prompt_tokens, t.generated_tokens, t.cached_tokens) if t else (0, 0, 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def q8chat_metrics(update: ChatUpdate | None) -> dict[str, Any]:
    t = update.timings if update else None
    if t is None:
        return {}
    return {
        "backend": update.backend,
        "scheme": update.scheme,
        "ttft_ms": round(t.ttft_ms, 2),
        "tpot_ms": round(t.tpot_ms, 3),
        "tokens_per_s": round(t.tokens_per_s, 2),
        "dropped_turns": update.dropped_turns,
    }


def create_router(service: ChatService, warmup: Warmup) -> APIRouter:
    router = APIRouter(prefix="/v1")

    def authorize(request: Request) -> None:
        key = os.environ.get("Q8CHAT_API_KEY")
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'", "authentication")

    @router.get("/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            authorize(request)
            from remote_backend.engine import remote_model

            ids = model_ids(remote_model())
        except Exception as e:  # noqa: BLE001
            return error_for(e).response()
        data = [
            {"id": i, "object": "model", "created": CREATED, "owned_by": "q8chat", "backend": b, "scheme": s}
            for i, _, b, s in ids
        ]
        return JSONResponse({"object": "list", "data": data})

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        try:
            authorize(request)
            try:
                body = await request.json()
            except ValueError:
                raise APIError(400, "the request body is not valid JSON") from None
            model, settings, message, history, stream, include_usage = parse_request(body)
            warmup.check(settings.backend, settings.scheme)
        except Exception as e:  # noqa: BLE001
            return error_for(e).response()

        cancel = threading.Event()

        def work(emit: Callable[[Any], None]) -> None:
            for update in service.chat(message, history, settings, cancel):
                emit(update)

        queue, _ = run_in_thread(work)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        # The first update (or error) decides the status code: validation and loading errors come before it.
        first = await queue.get()
        if isinstance(first, BaseException):
            return error_for(first).response()

        if not stream:
            last, item = first, first
            try:
                while item is not None:
                    if isinstance(item, BaseException):
                        return error_for(item).response()
                    last = item
                    item = await queue.get()
            finally:
                cancel.set()
            text = last.text if last else ""
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": FINISH.get(last.finish_reason if last else None, "stop"),
                        }
                    ],
                    "usage": usage_of(last),
                    "q8chat": q8chat_metrics(last),
                }
            )

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            sent, item, last = "", first, None
            try:
                yield chunk({"role": "assistant", "content": ""})
                while item is not None:
                    if isinstance(item, BaseException):
                        err = error_for(item)
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.type}})}\n\n"
                        return
                    last = item
                    new, sent = item.text[len(sent) :], item.text
                    if new:
                        yield chunk({"content": new})
                    if item.done:
                        yield chunk({}, FINISH.get(item.finish_reason, "stop"), q8chat=q8chat_metrics(item))
                    item = await queue.get()
                if include_usage:
                    usage = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
                    usage |= {"choices": [], "usage": usage_of(last)}
                    yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # a client that goes away stops the engine within one decode step

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return router
