"""Chat service: the one place that picks an engine, hands it the chat (messages) and streams the answer.

The Gradio page and the HTTP API call this; it never touches tensors itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil

from models.backend import Backend, RequestError, SamplingParams, Timings
from models.chat import chat_messages
from models.registry import DEFAULT_MODEL
from quant import progress
from quant.progress import BuildProgress
from quant.schemes import DEFAULT_SCHEME

log = logging.getLogger("q8chat")
GIB = 1 << 30

BACKENDS = ("cpu", "openvino", "ipex", "gpu", "remote")
# How the app names them; IPEX is legacy and opt-in (archived upstream with a security notice).
BACKEND_LABELS = {"openvino": "OpenVINO", "ipex": "IPEX (legacy)"}


def backend_label(name: str) -> str:
    return BACKEND_LABELS.get(name, name.upper())


# The default engine is the fastest maintained one for the page's default scheme by the CPU benchmark
# (bench/results/cpu_latency.md): our own CPU engine; IPEX is legacy and never the default. Q8CHAT_BACKEND overrides.
DEFAULT_ORDER = ("cpu",)


def default_backend() -> str:
    chosen = os.environ.get("Q8CHAT_BACKEND", "").strip()
    if chosen:
        if chosen not in BACKENDS:
            raise RequestError(f"Q8CHAT_BACKEND={chosen!r} is not a backend: choose one of {', '.join(BACKENDS)}")
        return chosen
    return next((name for name in DEFAULT_ORDER if backend_availability(name)[0]), "cpu")


def backend_class(name: str) -> type[Backend]:
    if name == "cpu":
        from cpu_backend.engine import CPUEngine

        return CPUEngine
    if name == "gpu":
        from gpu_backend.engine import GPUEngine

        return GPUEngine
    if name == "remote":
        from remote_backend.engine import RemoteEngine

        return RemoteEngine
    if name == "openvino":
        from cpu_backend.intel import OpenVINOEngine

        return OpenVINOEngine
    if name == "ipex":
        from cpu_backend.intel import IPEXEngine

        return IPEXEngine
    raise RequestError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")


def backend_availability(name: str) -> tuple[bool, str]:
    try:
        return backend_class(name).availability()
    except RequestError:
        raise
    except Exception as e:  # a backend whose module cannot even import is unavailable, not fatal
        return False, f"{name} backend cannot load: {type(e).__name__}: {e}"


def build_progress() -> BuildProgress | None:
    """How far the checkpoint build that a load is waiting on has got (None: no build is running)."""
    return progress.current()


def backend_model(name: str) -> str | None:
    """The one model a backend serves whatever is asked (a remote server's configured model), else None."""
    if name == "remote":
        from remote_backend.engine import remote_model

        return remote_model()
    return None


def backend_schemes(name: str) -> tuple[str, ...]:
    """What the backend runs on this machine (it asks the hardware: CPU ISA, GPU compute capability)."""
    ok, _ = backend_availability(name)
    return backend_class(name).supported_schemes() if ok else ()


# Where a chat request (the page or /v1) leaves a sampling field out. Temperature follows each surface's
# convention (the page starts greedy, the OpenAI API defaults to 1); the rest is the same everywhere: a light
# repetition penalty and nucleus sampling keep a 135M model from looping.
CHAT_DEFAULTS = SamplingParams(max_new_tokens=256, top_p=0.9, top_k=0, repetition_penalty=1.1)


@dataclass
class ChatSettings:
    backend: str = "cpu"
    model: str = DEFAULT_MODEL
    scheme: str = DEFAULT_SCHEME
    system_prompt: str = ""
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class ChatUpdate:
    text: str  # the whole answer so far
    done: bool = False
    finish_reason: str | None = None
    timings: Timings | None = None  # on the last update
    backend: str = ""
    scheme: str = ""

    @property
    def dropped_turns(self) -> int:
        """Oldest turns left out to fit the context (known with the last update)."""
        return self.timings.dropped_turns if self.timings else 0


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now, or None where it cannot be read (the check is skipped)."""
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError):
        return None


class ChatService:
    """Keeps one loaded engine per backend; a failed load leaves the previous one serving."""

    def __init__(self) -> None:
        self._engines: dict[str, Backend] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._load_lock = threading.Lock()

    def is_loaded(self, backend: str, model: str, scheme: str) -> bool:
        return self._keys.get(backend) == (model, scheme)

    def engine(self, backend: str, model: str, scheme: str) -> Backend:
        ok, reason = backend_availability(backend)
        if not ok:
            raise RequestError(f"the {backend.upper()} backend is not available: {reason}")
        key = (model, scheme)
        with self._load_lock:
            if self._keys.get(backend) != key:
                from cpu_backend.runtime import bound_kernel_caches

                bound_kernel_caches()  # before a model first runs: per-shape kernel caches stay small (soak)
                cls = backend_class(backend)
                if scheme not in cls.supported_schemes():
                    choices = ", ".join(cls.supported_schemes())
                    raise RequestError(f"scheme {scheme!r} is not available on {backend}; choose one of {choices}")
                need, free = cls.load_bytes(model, scheme), available_memory_bytes()
                if need is not None and free is not None and need > free:
                    raise RequestError(
                        f"not enough memory to load {model!r} ({scheme}): it needs about {need / GIB:.2f} GiB "
                        f"and {free / GIB:.2f} GiB are available; the previous model keeps serving"
                    )
                log.info("loading %s on %s (%s)", model, backend, scheme)
                started = time.monotonic()
                try:
                    engine = cls(model, scheme)
                except MemoryError as e:
                    raise RequestError(
                        f"not enough memory to load {model!r} ({scheme}); the previous model keeps serving"
                    ) from e
                log.info("loaded %s on %s (%s) in %.1f s", model, backend, scheme, time.monotonic() - started)
                replaced = self._engines.get(backend)
                self._engines[backend], self._keys[backend] = engine, key
                if replaced is not None:
                    replaced.close()  # a worker process would otherwise outlive its engine
            return self._engines[backend]

    def chat(
        self, message: str, history: object, settings: ChatSettings, cancel: threading.Event | None = None
    ) -> Iterator[ChatUpdate]:
        if not isinstance(settings.sampling, SamplingParams):
            raise RequestError("sampling settings are malformed")
        settings.sampling.validate()
        messages = chat_messages(message, history, settings.system_prompt)
        engine = self.engine(settings.backend, settings.model, settings.scheme)
        text = ""
        for event in engine.generate(messages, settings.sampling, cancel):
            text += event.text
            yield ChatUpdate(
                text,
                done=event.finished,
                finish_reason=event.finish_reason,
                timings=event.timings if event.finished else None,
                backend=settings.backend,
                scheme=engine.scheme,
            )
