"""GPU engine: the app's Backend on CUDA, decode steps replayed from a CUDA graph.

The sampled tokens come from ``_tokens_on_gpu``, a ``spaces.GPU`` task on a ZeroGPU Space (see
``gpu_backend.zerogpu``: there the decoder is built and its graphs captured inside the GPU worker, on first
use, and only token ids come back) and a plain generator everywhere else.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch

from gpu_backend import availability, kv_options_for, schemes_for, supported_schemes, zerogpu
from gpu_backend.model import GPUDecoder
from gpu_backend.weights import build_decoder, build_from_checkpoint, load_quantized_linears
from models.backend import RequestError, SamplingParams
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import Generator, GeneratorBackend
from models.registry import resolve
from quant.schemes import DEFAULT_SCHEME, get_scheme

MAX_CONTEXT = 8192


def prepare_checkpoint(model: str, scheme: str) -> tuple[Path, DecoderConfig]:
    """The folder the GPU decoder loads, without CUDA (the ZeroGPU main process calls this): the model folder
    for BF16, else the same ``quant.build`` checkpoint the CPU backend loads (cached)."""
    if get_scheme(scheme).quantizes_weights:
        from quant import build

        folder = Path(build(model, scheme))
    else:
        folder = resolve(model)
    return folder, DecoderConfig.from_file(folder / "config.json")


def load_for_gpu(model: str, scheme: str, kv_cache: str | None, device: str = "cuda") -> tuple[GPUDecoder, Path]:
    """The GPU decoder for (model, scheme): BF16 from the model folder, a quantized scheme from the same
    ``quant.build`` checkpoint the CPU backend loads (cached, validated by ``quant.checkpoint.load_checkpoint``)."""
    folder, cfg = prepare_checkpoint(model, scheme)
    return decoder_from_folder(folder, cfg, scheme, kv_cache, device), folder


def decoder_from_folder(
    folder: Path, cfg: DecoderConfig, scheme: str, kv_cache: str | None, device: str = "cuda"
) -> GPUDecoder:
    if get_scheme(scheme).quantizes_weights:
        from quant.checkpoint import load_checkpoint

        ckpt = load_checkpoint(folder, verify_hashes=False)  # prepare_checkpoint's build() validated it
        return build_from_checkpoint(ckpt, kv_cache, device)
    return build_decoder(load_quantized_linears(folder), cfg, scheme, kv_cache or "bf16", device)


# (checkpoint folder, scheme, kv_cache, context) -> the graph-replaying generator, in the process that holds
# the GPU (the folder is prepared in the main process: the GPU side only loads it)
_GENERATORS: dict[tuple, GraphGenerator] = {}
_WARM: set[tuple] = set()  # keys a GPU call has built a generator for (the duration estimate's cold start)


def _load_generator(key: tuple) -> GraphGenerator:
    folder, scheme, kv_cache, context = key
    try:
        decoder = decoder_from_folder(
            Path(folder), DecoderConfig.from_file(Path(folder) / "config.json"), scheme, kv_cache
        )
    except ValueError as e:  # CheckpointError and SchemeError are ValueErrors with a message that says what to do
        raise RequestError(str(e)) from e
    decoder.allocate(1, context)
    decoder.decode_graph(1)  # capture now: before any prefill fills the cache
    gen = _GENERATORS[key] = GraphGenerator(decoder)
    return gen


def _gpu_duration(key: tuple, prompt_ids: list[int], params: SamplingParams, budget: int) -> int:
    return zerogpu.duration_estimate(len(prompt_ids), budget, warm=key in _WARM)


def _tokens(key: tuple, prompt_ids: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
    """At most ``budget`` sampled token ids, computed where the GPU is (a ZeroGPU worker, or this process); the
    generator for ``key`` is built there on first use. Only ints leave."""
    gen = _GENERATORS.get(key) or _load_generator(key)
    _, tokens = gen.start(prompt_ids, params)
    try:
        yield from itertools.islice(tokens, budget)
    finally:
        tokens.close()


_tokens_on_gpu = zerogpu.gpu_call(_tokens, duration=_gpu_duration)


class GraphGenerator(Generator):
    """models.generate.Generator over a GPUDecoder: prefill eagerly, decode by graph replay."""

    reuses_prefix = False  # GPUDecoder.prefill starts at position 0

    def __init__(self, model: GPUDecoder) -> None:  # noqa: D107
        # the base class would allocate a models.decoder KV cache; ours lives in the GPUDecoder
        self.model, self.device = model, "cuda"
        self._pos = torch.zeros(1, dtype=torch.int32, device="cuda")
        self._tok = torch.zeros(1, dtype=torch.long, device="cuda")

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def prefill(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        assert start == 0, "the GPU prefill starts at position 0"
        return self.model.prefill(ids.to("cuda"))[0]

    def decode(self, token: int, pos: int) -> torch.Tensor:
        self._tok.fill_(token)
        self._pos.fill_(pos)
        return self.model.decode(self._tok, self._pos)[0]


class GPUEngine(GeneratorBackend):
    name = "gpu"

    def __init__(
        self, model: str, scheme: str = DEFAULT_SCHEME, kv_cache: str | None = None, max_context: int = MAX_CONTEXT
    ) -> None:
        """kv_cache: None = the checkpoint's KV scheme (calibrated scales) or bf16; "bf16", "fp8" or "int8".

        On a ZeroGPU Space nothing here touches CUDA: the checkpoint is prepared and the tokenizer loaded; the
        decoder is built inside the first GPU call."""
        zero = zerogpu.zero_gpu()
        ok, why = self.availability()
        if not ok:
            raise RequestError(f"the GPU backend is not available: {why}")
        cap = zerogpu.ZERO_GPU_CAPABILITY if zero else torch.cuda.get_device_capability()
        gpu_name = "this ZeroGPU slice" if zero else torch.cuda.get_device_name()
        if scheme not in schemes_for(cap):
            raise RequestError(
                f"scheme {scheme!r} is not available on {gpu_name}; choose one of {', '.join(schemes_for(cap))}"
            )
        if kv_cache is not None and kv_cache not in kv_options_for(cap):
            options = ", ".join(kv_options_for(cap))
            raise RequestError(f"KV cache {kv_cache!r} is not available here; choose one of {options}")
        super().__init__(scheme)
        self.model_spec = model
        try:
            folder, cfg = prepare_checkpoint(model, scheme)
        except ValueError as e:  # CheckpointError and SchemeError are ValueErrors with a message that says what to do
            raise RequestError(str(e)) from e
        self.tokenizer = load_tokenizer(folder)  # checkpoints carry the source tokenizer and chat template
        self._context = min(cfg.max_position_embeddings, max_context)
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._key = (str(folder), scheme, kv_cache, self._context)
        self.kv_cache = kv_cache or "the checkpoint's"
        if zero:
            return
        self.generator = _load_generator(self._key)
        _WARM.add(self._key)
        self.kv_cache = {torch.bfloat16: "bf16", torch.int8: "int8"}.get(self.generator.model.kv_dtype, "fp8")
        if self.kv_cache not in kv_options_for(cap):
            raise RequestError(f"the checkpoint's {self.kv_cache} KV cache is not available on this GPU")

    def start(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> tuple[int, Iterator[int]]:
        # the GPU prefill starts at position 0 (no prompt reuse): 0 prompt tokens served from the cache
        return 0, self._token_stream(list(prompt_ids), params, budget)

    def _token_stream(self, prompt_ids: list[int], params: SamplingParams, budget: int) -> Iterator[int]:
        stream = _tokens_on_gpu(self._key, prompt_ids, params, budget)
        try:
            for token in stream:
                _WARM.add(self._key)
                yield token
        finally:  # Stop or EOS: end the GPU task now, not when the stream is collected
            stream.close()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if zerogpu.zero_gpu():  # the main process of a ZeroGPU Space has no CUDA; its GPU calls do
            return True, ""
        return availability()

    @classmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        if zerogpu.zero_gpu():
            return schemes_for(zerogpu.ZERO_GPU_CAPABILITY)
        return supported_schemes()
