"""What every engine offers the app: load a (model, scheme), stream tokens, report timings."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

MAX_NEW_TOKENS_LIMIT = 4096
GREEDY_BELOW = 1e-4  # temperature
TEMPERATURE_MAX = 2.0  # OpenAI's range; the page's slider stops here too
SEED_MAX = 2**63 - 1  # what torch.Generator.manual_seed takes


class RequestError(ValueError):
    """A request the user must change (bad parameter, prompt too long, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always generate max_new_tokens
    cache_prompt: bool = True  # prefill only what the KV cache does not hold yet (False: the whole prompt, cold)

    @property
    def greedy(self) -> bool:
        """Temperatures this small divide logits into inf/NaN; they mean greedy decoding anyway."""
        return self.temperature < GREEDY_BELOW

    def validate(self) -> SamplingParams:
        def number(name: str, value: object, kind: type) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            if value != value:  # NaN
                raise RequestError(f"{name} must be a number, got NaN")

        number("max_new_tokens", self.max_new_tokens, int)
        number("temperature", self.temperature, float)
        number("top_p", self.top_p, float)
        number("top_k", self.top_k, int)
        number("repetition_penalty", self.repetition_penalty, float)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise RequestError(
                f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature <= TEMPERATURE_MAX:
            raise RequestError(f"temperature must be between 0 and {TEMPERATURE_MAX:g}, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= 100_000:
            raise RequestError(f"top_k must be between 0 (off) and 100000, got {self.top_k}")
        if not 0.5 <= self.repetition_penalty <= 2.0:
            raise RequestError(f"repetition_penalty must be between 0.5 and 2, got {self.repetition_penalty}")
        if not isinstance(self.cache_prompt, bool):
            raise RequestError(f"cache_prompt must be true or false, got {self.cache_prompt!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX
        ):
            raise RequestError(f"seed must be a whole number from 0 to {SEED_MAX} or empty, got {self.seed!r}")
        return self


@dataclass
class Timings:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # leading prompt tokens whose keys and values were already in the cache (not prefilled)
    dropped_turns: int = 0  # oldest conversation turns left out to fit the context
    generated_tokens: int = 0
    ttft_ms: float = 0.0  # request start -> first token out
    tpot_ms: float = 0.0  # mean time per output token after the first
    total_ms: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.tpot_ms if self.tpot_ms > 0 else 0.0


class Stopwatch:
    """Times one streamed answer: started with the request, told of each token as it arrives."""

    def __init__(self, prompt_tokens: int = 0, dropped_turns: int = 0) -> None:
        self.timings = Timings(prompt_tokens=prompt_tokens, dropped_turns=dropped_turns)
        self.start = self.first = self.last = time.perf_counter()

    def token(self) -> None:
        self.last = time.perf_counter()
        if self.timings.generated_tokens == 0:
            self.first = self.last
            self.timings.ttft_ms = (self.first - self.start) * 1000
        self.timings.generated_tokens += 1

    def finish(self, generated_tokens: int | None = None) -> Timings:
        """The final timings; ``generated_tokens`` when the server counted them (streamed chunks are not tokens)."""
        t = self.timings
        if generated_tokens is not None:
            t.generated_tokens = generated_tokens
        n = t.generated_tokens
        t.tpot_ms = (self.last - self.first) * 1000 / (n - 1) if n > 1 else 0.0
        t.total_ms = (time.perf_counter() - self.start) * 1000
        return t


@dataclass
class TokenEvent:
    """One streamed step: ``text`` is the new printable text (may be empty mid-character)."""

    text: str
    token_id: int | None = None
    finished: bool = False
    finish_reason: str | None = None  # "eos" | "length" | "cancelled"
    timings: Timings = field(default_factory=Timings)


Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


class Backend(ABC):
    """An engine bound to one loaded model and scheme: a chat (messages) in, a stream of text out."""

    name: str = "?"
    CAPACITY: int = 1  # generations one loaded engine runs at once (a local engine serializes on its lock: 1)

    @classmethod
    @abstractmethod
    def availability(cls) -> tuple[bool, str]:
        """(usable on this machine, reason when not)."""

    @classmethod
    @abstractmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        """The schemes this backend runs on this machine (asked of the hardware, not a fixed list)."""

    @classmethod
    def load_bytes(cls, model: str, scheme: str) -> int | None:
        """Host memory loading (model, scheme) takes, for a check before loading; None: nothing loads here."""
        return None

    @property
    @abstractmethod
    def scheme(self) -> str: ...

    @property
    @abstractmethod
    def context_length(self) -> int: ...

    @abstractmethod
    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """Stream the answer to a chat (system, user and assistant messages, the last one the user's); the last
        event has finished=True and the timings."""

    def close(self) -> None:
        """Free what the engine holds outside this process's memory (a worker process); idempotent."""
        return None
