"""GPU engine: the app's Backend on CUDA, decode steps replayed from a CUDA graph.

Generation runs through ``_generate_on_gpu``, a ``spaces.GPU`` task on a ZeroGPU Space (see
``gpu_backend.zerogpu``: there the decoder is built and its graphs captured inside the GPU worker, on first
use) and a plain call everywhere else.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from gpu_backend import availability, kv_options_for, schemes_for, zerogpu
from gpu_backend.model import GPUDecoder
from gpu_backend.weights import build_decoder, build_from_checkpoint, canonical_scheme, load_quantized_linears
from models.backend import RequestError, SamplingParams, TokenEvent
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import Generator, GeneratorBackend
from models.registry import resolve

MAX_CONTEXT = 8192


def prepare_checkpoint(model: str, scheme: str) -> tuple[Path, DecoderConfig]:
    """The folder the GPU decoder loads (no CUDA: the ZeroGPU main process calls this): the same
    ``quant.build`` checkpoint the CPU backend loads (cached), or the model's own folder for schemes quant does
    not make (w8a16-fp8: quantized round-to-nearest at load)."""
    from quant import SCHEMES as QUANT_SCHEMES

    if scheme in QUANT_SCHEMES:
        from quant import build

        folder = Path(build(model, scheme))
    else:
        folder = resolve(model)
    return folder, DecoderConfig.from_file(folder / "config.json")


def load_for_gpu(model: str, scheme: str, kv_cache: str | None, device: str = "cuda") -> tuple[GPUDecoder, Path]:
    """The GPU decoder for (model, scheme) from ``prepare_checkpoint``'s folder (a quant checkpoint validated
    by ``quant.checkpoint.load_checkpoint``)."""
    from quant import SCHEMES as QUANT_SCHEMES

    folder, cfg = prepare_checkpoint(model, scheme)
    if scheme in QUANT_SCHEMES:
        from quant.checkpoint import load_checkpoint

        ckpt = load_checkpoint(folder, verify_hashes=False)  # build() has just validated it
        return build_from_checkpoint(ckpt, kv_cache, device), folder
    return build_decoder(load_quantized_linears(folder), cfg, scheme, kv_cache or "bf16", device), folder


# (model, scheme, kv_cache, max_context) -> the graph-replaying generator, in the process that holds the GPU
_GENERATORS: dict[tuple, GraphGenerator] = {}
_WARM: set[tuple] = set()  # keys whose generator a GPU call has built (the duration estimate's cold start)


def _load_generator(key: tuple) -> GraphGenerator:
    model, scheme, kv_cache, max_context = key
    try:
        decoder, folder = load_for_gpu(model, scheme, kv_cache)
    except ValueError as e:  # CheckpointError and SchemeError are ValueErrors with a message that says what to do
        raise RequestError(str(e)) from e
    tokenizer = load_tokenizer(folder)  # checkpoints carry the source tokenizer and chat template
    cfg = decoder.cfg
    decoder.allocate(1, min(cfg.max_position_embeddings, max_context))
    decoder.decode_graph(1)  # capture now: before any prefill fills the cache
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    gen = _GENERATORS[key] = GraphGenerator(decoder, tokenizer, eos)
    return gen


def _gpu_duration(key: tuple, prompt_ids: list[int], params: SamplingParams, cancel=None) -> int:
    return zerogpu.duration_estimate(len(prompt_ids), params.max_new_tokens, warm=key in _WARM)


def _generate(
    key: tuple, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
) -> Iterator[TokenEvent]:
    """One generation where the GPU is (a ZeroGPU worker, or this process): the generator for ``key`` is built
    on first use there; only TokenEvents (plain values) leave."""
    gen = _GENERATORS.get(key) or _load_generator(key)
    yield from gen.generate(prompt_ids, params, cancel)


_generate_on_gpu = zerogpu.gpu_call(_generate, duration=_gpu_duration)


class GraphGenerator(Generator):
    """models.generate.Generator over a GPUDecoder: prefill eagerly, decode by graph replay."""

    reuses_prefix = False  # GPUDecoder.prefill starts at position 0

    def __init__(self, model: GPUDecoder, tokenizer, eos_ids: set[int]) -> None:  # noqa: D107
        # the base class would allocate a models.decoder KV cache; ours lives in the GPUDecoder
        self.model, self.tokenizer, self.eos_ids, self.device = model, tokenizer, set(eos_ids), "cuda"
        self.lock = threading.Lock()
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
    # quant's scheme names (the checkpoints the CPU backend loads too); what this GPU runs: supported_schemes()
    SCHEMES = ("bf16", "w8a16-int8", "w8a8-int8", "w8a8-fp8")

    def __init__(
        self, model: str, scheme: str = "bf16", kv_cache: str | None = None, max_context: int = MAX_CONTEXT
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
        scheme = canonical_scheme(scheme)
        if scheme not in schemes_for(cap):
            raise RequestError(
                f"scheme {scheme!r} is not available on {gpu_name}; choose one of {', '.join(schemes_for(cap))}"
            )
        if kv_cache is not None and kv_cache not in kv_options_for(cap):
            options = ", ".join(kv_options_for(cap))
            raise RequestError(f"KV cache {kv_cache!r} is not available here; choose one of {options}")
        self.model_spec, self._scheme = model, scheme
        self._key = (model, scheme, kv_cache, max_context)
        if zero:
            try:
                folder, cfg = prepare_checkpoint(model, scheme)
            except ValueError as e:
                raise RequestError(str(e)) from e
            self.tokenizer = load_tokenizer(folder)
            self.kv_cache = kv_cache or "checkpoint"
            self._context = min(cfg.max_position_embeddings, max_context)
            return
        gen = _load_generator(self._key)
        _WARM.add(self._key)
        self.kv_cache = {torch.bfloat16: "bf16", torch.int8: "int8"}.get(gen.model.kv_dtype, "fp8")
        if self.kv_cache not in kv_options_for(cap):
            raise RequestError(f"the checkpoint's {self.kv_cache} KV cache is not available on this GPU")
        self.generator, self.tokenizer = gen, gen.tokenizer
        self._context = gen.max_len

    @property
    def context_length(self) -> int:
        return self._context

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        if zerogpu.zero_gpu():
            # a threading.Event cannot cross into the GPU worker: Stop closes this generator, which ends the task
            yield from _generate_on_gpu(self._key, list(prompt_ids), params)
            _WARM.add(self._key)
        else:
            yield from _generate_on_gpu(self._key, prompt_ids, params, cancel)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if zerogpu.zero_gpu():  # the main process of a ZeroGPU Space has no CUDA; its GPU calls do
            return True, ""
        return availability()
