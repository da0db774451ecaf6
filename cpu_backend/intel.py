"""The Intel engines: OpenVINO (optimum-intel, maintained) and IPEX (legacy, opt-in), each in a worker process.

Each runtime pins its own torch/transformers, so it runs in its own venv (`make venv-openvino`, `make venv-ipex`)
as ``python -m cpu_backend.intel_worker``. This process renders and tokenizes the chat, sends token ids, and
streams the ids that come back through the same detokenizer and timings as our own engine. The quantized models
come from the shared pipeline: W8A8 runs ``quant.export``'s smoothed model with static activation scales
calibrated on the shared calibration ids; weight-only INT8 and BF16 run the model folder itself.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from models.backend import Backend, RequestError, SamplingParams, Timings, TokenEvent
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import TextStream
from models.registry import cache_dir, resolve

ROOT = Path(__file__).resolve().parent.parent
INTEL_SCHEMES = ("bf16", "w8a16-int8", "w8a8-int8")
MAX_CONTEXT = 8192
LOAD_TIMEOUT_S = 1800  # first W8A8 load = export + calibration + conversion
TOKEN_TIMEOUT_S = 300  # no token for this long: the worker is stuck
LOG_TAIL = 1500


class WorkerError(RequestError):
    """The worker failed to load or died; the message carries its own explanation."""


# At most one worker process per runtime: each holds a whole model (~1 GB for the embedded one), so an engine that
# starts its worker stops the one another engine of the same runtime left running (a scheme switch).
_workers: dict[str, IntelWorkerEngine] = {}
_workers_lock = threading.Lock()


@atexit.register
def _stop_workers() -> None:
    for engine in list(_workers.values()):
        engine.close()


class IntelWorkerEngine(Backend):
    runtime: str  # the venv suffix and the worker's --runtime
    SCHEMES = INTEL_SCHEMES

    def __init__(self, model: str, scheme: str = "bf16", threads: int | None = None,
                 calibration_samples: int = 32) -> None:
        if scheme not in INTEL_SCHEMES:
            raise RequestError(f"scheme {scheme!r} is not available on {self.name}; choose one of "
                               f"{', '.join(INTEL_SCHEMES)}")
        ok, reason = self.availability()
        if not ok:
            raise RequestError(f"the {self.name} engine is not available: {reason}")
        from cpu_backend.threads import physical_cores

        self.model_spec, self._scheme = model, scheme
        source = resolve(model)
        self.tokenizer = load_tokenizer(source)
        cfg = DecoderConfig.from_file(source / "config.json")
        self.eos = set(cfg.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self._context = min(cfg.max_position_embeddings, MAX_CONTEXT)
        if scheme == "w8a8-int8":
            from quant.export import export_smoothed

            folder = export_smoothed(model)
        else:
            folder = source
        self.threads = threads or physical_cores()
        key = hashlib.sha256(f"{folder.resolve()}|{self.python().resolve()}".encode()).hexdigest()[:16]
        self.work = cache_dir() / "intel" / f"{self.runtime}-{key}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / f"worker-{scheme}.log"
        self.command = [str(self.python()), "-m", "cpu_backend.intel_worker", "--runtime", self.runtime,
                        "--scheme", scheme, "--folder", str(folder), "--work", str(self.work),
                        "--threads", str(self.threads), "--calibration-samples", str(calibration_samples)]
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self._start()

    # --- worker life cycle ---

    @classmethod
    def python(cls) -> Path:
        return ROOT / f".venv-{cls.runtime}" / "bin" / "python"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if not cls.python().is_file():
            return False, f"its environment is not built: run `make venv-{cls.runtime}`"
        return True, ""

    def _start(self) -> None:
        with _workers_lock:
            previous, _workers[self.runtime] = _workers.get(self.runtime), self
        if previous is not None and previous is not self:
            previous.close()  # before the new worker loads: never two models of one runtime in memory
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=log, text=True, bufsize=1)
        log.close()
        message = self._read(LOAD_TIMEOUT_S, "loading")
        if "ready" not in message:
            self.close()
            raise WorkerError(f"the {self.name} engine could not load {self.model_spec!r} ({self.scheme}): "
                              f"{message.get('error', message)}")
        self.info = message["ready"]

    def _read(self, timeout: float, doing: str) -> dict:
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            self.close()
            raise WorkerError(f"the {self.name} worker stopped answering while {doing} (>{timeout:.0f} s); "
                              f"it was stopped{self._log_tail()}")
        if not result or not result[0]:
            self.close()
            raise WorkerError(f"the {self.name} worker exited while {doing}{self._log_tail()}")
        return json.loads(result[0])

    def _log_tail(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-LOG_TAIL:].strip()
        except OSError:
            return ""
        return f"; its log ({self.log_path}) ends with:\n{tail}" if tail else ""

    def _send(self, **request) -> None:
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError) as e:
            self.close()
            raise WorkerError(f"the {self.name} worker is gone ({e}){self._log_tail()}") from e

    def _alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._start()  # a worker that died (killed, crashed) is restarted for the next request

    def close(self) -> None:
        with _workers_lock:
            if _workers.get(self.runtime) is self:
                del _workers[self.runtime]
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.stdin.write('{"op": "quit"}\n')
                proc.stdin.flush()
                proc.wait(5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    # --- Backend ---

    @property
    def scheme(self) -> str:
        return self._scheme

    @property
    def context_length(self) -> int:
        return self._context

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 cancel: threading.Event | None = None) -> Iterator[TokenEvent]:
        params.validate()
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self._context:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self._context}")
        budget = min(params.max_new_tokens, self._context - len(prompt_ids))
        with self.lock:
            yield from self._run(prompt_ids, params, budget, cancel)

    def _run(self, prompt_ids, params: SamplingParams, budget: int, cancel) -> Iterator[TokenEvent]:
        self._alive()
        timings = Timings(prompt_tokens=len(prompt_ids))
        stream = TextStream(self.tokenizer)
        start = time.perf_counter()
        first = last = start
        self._send(op="generate", ids=list(prompt_ids), eos=sorted(self.eos), max_new_tokens=budget,
                   temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, top_k=params.top_k,
                   repetition_penalty=params.repetition_penalty, seed=params.seed, ignore_eos=params.ignore_eos)
        cancel_sent = False
        try:
            while True:
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    self._send(op="cancel")
                    cancel_sent = True
                message = self._read(TOKEN_TIMEOUT_S, "generating")
                if "token" in message:
                    last = time.perf_counter()
                    if timings.generated_tokens == 0:
                        first = last
                        timings.ttft_ms = (first - start) * 1000
                    timings.generated_tokens += 1
                    if message["token"] not in self.eos or params.ignore_eos:
                        yield TokenEvent(stream.push(message["token"]), message["token"])
                    continue
                if "error" in message:
                    raise WorkerError(f"the {self.name} engine failed: {message['error']}")
                reason = message["done"]
                break
        except GeneratorExit:  # the consumer went away mid-stream: stop the worker's generation, drain it
            self._send(op="cancel")
            self._drain()
            raise
        n = timings.generated_tokens
        timings.tpot_ms = (last - first) * 1000 / (n - 1) if n > 1 else 0.0
        timings.total_ms = (time.perf_counter() - start) * 1000
        yield TokenEvent(stream.flush(), None, finished=True, finish_reason=reason, timings=timings)

    def _drain(self) -> None:
        while True:
            message = self._read(TOKEN_TIMEOUT_S, "cancelling")
            if "token" not in message:
                return

    def score(self, windows: list[list[int]]) -> tuple[list[float], list[list[int]]]:
        """Per window: summed NLL of tokens 2..n and the argmax prediction at each position (quality eval)."""
        with self.lock:
            self._alive()
            self._send(op="score", ids=windows)
            message = self._read(LOAD_TIMEOUT_S, "scoring")
        if "error" in message:
            raise WorkerError(f"the {self.name} engine failed: {message['error']}")
        return message["nll"], message["argmax"]


class OpenVINOEngine(IntelWorkerEngine):
    name = "openvino"
    runtime = "openvino"


class IPEXEngine(IntelWorkerEngine):
    """Legacy: IPEX 2.8 is its last release and its repository was archived in 2026 with a security notice."""

    name = "ipex"
    runtime = "ipex"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        ok, reason = super().availability()
        if not ok:
            return False, f"{reason} (legacy, opt-in: IPEX 2.8 is archived upstream with a security notice)"
        return True, ""
