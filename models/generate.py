"""The token loop shared by every engine: prefill, sample, decode, detokenize, time."""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Iterator

import torch
from tokenizers.decoders import DecodeStream

from models.backend import Backend, Message, RequestError, SamplingParams, Stopwatch, TokenEvent
from models.chat import render_chat
from models.decoder import Decoder, KVCache


def sample(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None, rng: torch.Generator | None) -> int:
    """Next token from 1-D float logits, in Hugging Face's order: penalty, temperature, top-k, top-p."""
    if params.repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=rng))


class TextStream:
    """Incremental detokenization (tokenizers' DecodeStream): text is released only once it is whole, never half
    a UTF-8 character or a word piece that the next token changes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer.backend_tokenizer  # the Rust tokenizer behind a transformers fast tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> str:
        return self.stream.step(self.tokenizer, token) or ""

    def flush(self) -> str:
        """What is still held back at the end: nothing printable (an unfinished character is dropped)."""
        return ""


class LocalBackend(Backend):
    """A backend that runs the model itself (in this process or a worker it owns). Owns, once for all such
    engines: rendering the chat with the model's template, cutting the history to the context, one generation
    at a time (callers queue on ``lock``), detokenizing, stopping at EOS or the budget, cancelling, timing.

    Subclasses set ``tokenizer``, ``eos_ids`` and ``_context`` and implement ``start``.
    """

    tokenizer: object
    eos_ids: set[int]
    _context: int

    def __init__(self, scheme: str) -> None:
        self._scheme = scheme
        self.lock = threading.Lock()

    @property
    def scheme(self) -> str:
        return self._scheme

    @property
    def context_length(self) -> int:
        return self._context

    @abstractmethod
    def start(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> tuple[int, Iterator[int]]:
        """Begin a generation: (prompt tokens served from the KV cache, the sampled token ids, produced lazily:
        the next one is computed when asked for). Closing the iterator ends the generation."""

    def generate(
        self, messages: list[Message], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        params.validate()
        room = self.context_length - params.max_new_tokens
        if room < 16:
            raise RequestError(
                f"max new tokens ({params.max_new_tokens}) leaves no room for the prompt in the "
                f"{self.context_length}-token context: lower it"
            )
        prompt = render_chat(self.tokenizer, messages, room)
        return self._stream(prompt.ids, params, cancel, prompt.dropped_turns)

    def generate_ids(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        """``generate`` for an already rendered prompt (benchmarks, evaluation)."""
        params.validate()
        return self._stream(list(prompt_ids), params, cancel)

    def _stream(self, prompt_ids: list[int], params, cancel, dropped_turns: int = 0) -> Iterator[TokenEvent]:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; the context holds {self.context_length}")
        budget = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        with self.lock:
            watch = Stopwatch(len(prompt_ids), dropped_turns)
            watch.timings.cached_tokens, tokens = self.start(prompt_ids, params, budget)
            text, reason = TextStream(self.tokenizer), "length"
            try:
                while watch.timings.generated_tokens < budget:
                    if cancel is not None and cancel.is_set():
                        reason = "cancelled"
                        break
                    token = next(tokens)
                    watch.token()
                    if token in self.eos_ids and not params.ignore_eos:
                        reason = "eos"
                        break
                    yield TokenEvent(text.push(token), token)
            finally:  # also when the consumer stops reading: the engine stops computing
                tokens.close()
            yield TokenEvent(text.flush(), None, finished=True, finish_reason=reason, timings=watch.finish())


class Generator:
    """Runs a Decoder with one persistent KV cache, one generation at a time (its LocalBackend's lock).

    The cache outlives a generation: a prompt that starts with tokens the cache already holds (a chat's next turn
    repeats the conversation so far) prefills only the rest (``reuses_prefix``; the count is reported as
    ``Timings.cached_tokens``), except for seeded requests, which must not depend on what the cache held.
    Engines override ``prefill``/``decode`` to put compiled or graph-captured code on the hot path.
    """

    reuses_prefix = True

    def __init__(
        self,
        model: Decoder,
        max_len: int,
        device: str = "cpu",
        cache_dtype: torch.dtype | None = None,
    ) -> None:
        self.model, self.device = model, device
        self.cache: KVCache = model.new_cache(1, max_len, cache_dtype)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds, from position 0

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def prefill(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits after ``ids`` [1, T], placed at positions start.. (the cache holds the tokens before them)."""
        return self.model(ids, self.cache, start, last_only=True)[0, -1]

    def reusable(self, prompt_ids: list[int]) -> int:
        """How many leading tokens of ``prompt_ids`` the cache holds (at least the last one is prefilled again)."""
        if not self.reuses_prefix:
            return 0
        n, limit = 0, min(len(self.cached), len(prompt_ids) - 1)
        while n < limit and self.cached[n] == prompt_ids[n]:
            n += 1
        return n

    def decode(self, token: int, pos: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=self.device)
        return self.model(ids, self.cache, pos)[0, -1]

    def start(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, Iterator[int]]:
        # a seeded request prefills its whole prompt: logits after a partial prefill differ in the last bits (other
        # GEMM and attention blockings), and the same seed must give the same tokens whatever the cache holds
        reused = self.reusable(prompt_ids) if params.cache_prompt and params.seed is None else 0
        return reused, self._tokens(prompt_ids, reused, params)

    @torch.inference_mode()
    def _tokens(self, prompt_ids: list[int], reused: int, params: SamplingParams) -> Iterator[int]:
        rng = torch.Generator(device="cpu").manual_seed(params.seed) if params.seed is not None else None
        seen = torch.tensor(prompt_ids, dtype=torch.long) if params.repetition_penalty != 1.0 else None
        self.cached = []  # being overwritten: nothing reusable until the prefill is done
        logits = self.prefill(torch.tensor([prompt_ids[reused:]], device=self.device), reused)
        written = list(prompt_ids)
        try:
            while True:
                token = sample(logits.float().cpu(), params, seen, rng)
                if seen is not None:
                    seen = torch.cat([seen, torch.tensor([token])])
                yield token
                logits = self.decode(token, len(written))
                written.append(token)
        finally:  # also when the generation is closed mid-way: the cache holds exactly `written`
            self.cached = written


class GeneratorBackend(LocalBackend):
    """A LocalBackend whose engine is a ``Generator`` in this process."""

    generator: Generator

    def start(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> tuple[int, Iterator[int]]:
        return self.generator.start(prompt_ids, params)
