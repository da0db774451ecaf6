"""The app's OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` (streamed or not).

Mounted beside the Gradio page (see ``serving.server.create_app``). It goes through the same ``ChatService`` as
the page, so the same engines, validation and truncation apply; requests are parsed by pydantic models. Errors
are OpenAI-style JSON bodies, ``{"error": {"message", "type", "param", "code"}}``, with 400 (bad request), 401
(wrong API key), 404 (unknown model), 503 (model still loading, backend unavailable) or 500; never a traceback.

Choosing the engine: the ``model`` field is a model id from ``/v1/models``: ``smollm2-135m`` runs the default
backend and scheme, ``smollm2-135m@gpu:SCHEME`` names both; a model folder the operator allowed (``--model-dir``)
is named by its path. The extra body fields ``backend`` and ``scheme`` (``extra_body=`` in the ``openai`` client)
do the same. ``top_k`` and ``repetition_penalty`` are accepted as extra fields too, as vLLM does.

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
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.backend import SamplingParams
from models.registry import DEFAULT_MODEL, ModelNotFoundError, looks_like_path, operator_models, resolve
from quant.schemes import DEFAULT_SCHEME
from serving.service import (
    BACKENDS,
    CHAT_DEFAULTS,
    ChatService,
    ChatSettings,
    ChatUpdate,
    backend_availability,
    backend_model,
    backend_schemes,
    default_backend,
)
from serving.startup import NotReadyError, Warmup

log = logging.getLogger("q8chat")

CREATED = int(time.time())
FINISH = {"eos": "stop", "length": "length", "cancelled": "stop", None: "stop"}
ROLES = ("system", "developer", "user", "assistant")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions body as q8chat takes it; fields it cannot honour are accepted only at their
    no-op values (``check_supported``), unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | float | None = None  # a float is refused by SamplingParams.validate, in plain words
    # extras vLLM and llama.cpp take too
    top_k: int | None = None
    repetition_penalty: float | None = None
    backend: str | None = None
    scheme: str | None = None
    # OpenAI fields q8chat does not implement: refused unless at their default
    n: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if self.stop not in (None, [], ""):
            raise APIError(400, "'stop' sequences are not supported; leave it out", param="stop")
        for penalty in ("frequency_penalty", "presence_penalty"):
            if getattr(self, penalty) not in (None, 0.0):
                raise APIError(400, f"{penalty} is not supported; use repetition_penalty", param=penalty)
        for name in ("tools", "logprobs", "response_format", "logit_bias"):
            if getattr(self, name) not in (None, False, [], {}, {"type": "text"}):
                raise APIError(400, f"{name} is not supported by q8chat", param=name)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> JSONResponse:
        code = {401: "invalid_api_key", 404: "model_not_found", 503: "unavailable"}.get(self.status)
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": code}}
        return JSONResponse(body, status_code=self.status)


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint, in words that name the field as the request spells it."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"]]
    where = loc[0] + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:]) if loc else "body"
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown field: {where}", param=loc[-1] if loc else None)
    if err["type"] == "missing":
        return APIError(400, f"'{where}' is required", param=loc[0] if loc else None)
    return APIError(400, f"{where}: {err['msg']}", param=loc[0] if loc else None)


def error_for(e: Exception) -> APIError:
    """Every failure as an APIError whose message tells the caller what to do."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValidationError):
        return validation_error(e)
    if isinstance(e, NotReadyError):
        return APIError(503, str(e), "server_error")
    if isinstance(e, ModelNotFoundError):
        return APIError(404, str(e), param="model")
    if isinstance(e, ValueError):  # RequestError and the other validation errors speak to the user
        return APIError(400, str(e))
    log.exception("API request failed")
    return APIError(500, f"q8chat failed inside ({type(e).__name__}); the server log has the details", "server_error")


def model_ids() -> list[tuple[str, str, str, str]]:
    """(id, model, backend, scheme) for what this server can run now."""
    local = [DEFAULT_MODEL, *operator_models()]
    ids = [(m, m, default_backend(), DEFAULT_SCHEME) for m in local]
    for backend in BACKENDS:
        if not backend_availability(backend)[0]:
            continue
        models = [backend_model(backend) or DEFAULT_MODEL] if backend == "remote" else local
        ids += [(f"{m}@{backend}:{s}", m, backend, s) for m in models for s in backend_schemes(backend)]
    return ids


def model_not_found(name: str) -> APIError:
    return APIError(404, f"model {name!r} not found: GET /v1/models lists the ids this server runs", param="model")


def parse_model(model: str, backend: str | None, scheme: str | None) -> tuple[str, str, str]:
    name, _, target = model.strip().partition("@")
    if target:
        b, _, s = target.partition(":")
        backend, scheme = backend or b, scheme or s or None
    if backend is not None and backend not in BACKENDS:
        raise APIError(400, f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}", param="backend")
    backend = backend or default_backend()
    ok, reason = backend_availability(backend)
    if not ok:
        raise APIError(503, f"the {backend.upper()} backend is not available: {reason}", "server_error")
    schemes = backend_schemes(backend)
    scheme = scheme or schemes[0]
    if scheme not in schemes:
        raise APIError(400, f"scheme {scheme!r} is not available on {backend}; choose one of {', '.join(schemes)}")
    if backend == "remote":
        if name != (backend_model(backend) or DEFAULT_MODEL):
            raise model_not_found(name)
    elif name != DEFAULT_MODEL:
        if not looks_like_path(name):
            raise model_not_found(name)
        resolve(name)  # an operator-allowed folder or .gguf; anything else: a 404 that says why
    return name, backend, scheme


def parse_messages(messages: list[ChatMessage]) -> tuple[str, list[dict[str, str]], str]:
    """(system prompt, history, new user message) from an OpenAI message list."""
    if not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
    system, history = [], []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            supported = "system, user, assistant"
            raise APIError(400, f"messages[{i}]: role {m.role!r} is not supported ({supported})", param="messages")
        if m.role in ("system", "developer"):
            system.append(m.text)
        else:
            history.append({"role": m.role, "content": m.text})
    if not history or history[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return "\n\n".join(s for s in system if s.strip()), history[:-1], history[-1]["content"]


def parse_request(body: object) -> tuple[ChatCompletionRequest, ChatSettings, str, list[dict[str, str]]]:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    req = ChatCompletionRequest.model_validate(body)
    req.check_supported()
    model, backend, scheme = parse_model(req.model, req.backend, req.scheme)
    system, history, message = parse_messages(req.messages)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens

    def given(value: Any, default: Any) -> Any:
        return default if value is None else value

    params = SamplingParams(
        max_new_tokens=given(max_tokens, CHAT_DEFAULTS.max_new_tokens),
        temperature=given(req.temperature, 1.0),  # OpenAI's default
        top_p=given(req.top_p, CHAT_DEFAULTS.top_p),
        top_k=given(req.top_k, CHAT_DEFAULTS.top_k),
        repetition_penalty=given(req.repetition_penalty, CHAT_DEFAULTS.repetition_penalty),
        seed=req.seed,
    )
    params.validate()  # RequestError -> 400 with the parameter's own message
    return req, ChatSettings(backend, model, scheme, system, params), message, history


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
            ids = model_ids()
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
            req, settings, message, history = parse_request(body)
            warmup.check(settings.backend, settings.scheme)
            model = req.model  # answers name the model id the request asked for
            stream, include_usage = req.stream, bool(req.stream_options and req.stream_options.include_usage)
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
