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
from collections.abc import Iterator
from pathlib import Path

from models.backend import RequestError, SamplingParams
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import LocalBackend
from models.registry import cache_dir, resolve
from models.weights import parameter_count
from quant.schemes import DEFAULT_SCHEME, REGISTRY, SchemeError, get_scheme

ROOT = Path(__file__).resolve().parent.parent
# the worker's recipe for each scheme format it runs (quant.schemes.Scheme.formats); static-int8 runs
# quant.export's smoothed model with static activation scales calibrated on the shared calibration ids
RECIPES = {(None, None): "float", ("int", None): "weight-int8", ("int", "int"): "static-int8"}
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


class IntelWorkerEngine(LocalBackend):
    runtime: str  # the venv suffix and the worker's --runtime

    def __init__(self, model: str, scheme: str = DEFAULT_SCHEME, threads: int | None = None,
                 calibration_samples: int = 32) -> None:
        recipe = self.recipe(scheme)
        ok, reason = self.availability()
        if not ok:
            raise RequestError(f"the {self.name} engine is not available: {reason}")
        from cpu_backend.threads import physical_cores

        super().__init__(scheme)
        self.model_spec = model
        source = resolve(model)
        self.tokenizer = load_tokenizer(source)
        cfg = DecoderConfig.from_file(source / "config.json")
        self.eos_ids = set(cfg.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        self._context = min(cfg.max_position_embeddings, MAX_CONTEXT)
        if recipe == "static-int8":
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
                        "--recipe", recipe, "--folder", str(folder), "--work", str(self.work),
                        "--threads", str(self.threads), "--calibration-samples", str(calibration_samples)]
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

    @classmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        return tuple(s.name for s in REGISTRY.values() if s.formats in RECIPES) if cls.availability()[0] else ()

    @classmethod
    def recipe(cls, scheme: str) -> str:
        try:
            formats = get_scheme(scheme).formats
        except SchemeError as e:
            raise RequestError(str(e)) from None
        if formats not in RECIPES:
            choices = ", ".join(s.name for s in REGISTRY.values() if s.formats in RECIPES)
            raise RequestError(f"scheme {scheme!r} is not available on {cls.name}; choose one of {choices}")
        return RECIPES[formats]

    @classmethod
    def load_bytes(cls, model: str, scheme: str) -> int:
        """The worker's converted model: BF16 weights, or one byte per INT8 weight."""
        return parameter_count(resolve(model)) * (2 if cls.recipe(scheme) == "float" else 1)

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

    # --- LocalBackend ---

    def start(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> tuple[int, Iterator[int]]:
        self._alive()
        self._send(op="generate", ids=list(prompt_ids), eos=sorted(self.eos_ids), max_new_tokens=budget,
                   temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, top_k=params.top_k,
                   repetition_penalty=params.repetition_penalty, seed=params.seed, ignore_eos=params.ignore_eos)
        return 0, self._tokens()

    def _tokens(self) -> Iterator[int]:
        done = False
        try:
            while True:
                message = self._read(TOKEN_TIMEOUT_S, "generating")
                if "token" in message:
                    yield message["token"]
                    continue
                if "error" in message:
                    raise WorkerError(f"the {self.name} engine failed: {message['error']}")
                done = True
                return
        finally:  # closed mid-stream (EOS seen, cancelled, consumer gone): stop the worker's generation, drain it
            if not done and self.proc is not None:
                self._send(op="cancel")
                self._drain()

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
