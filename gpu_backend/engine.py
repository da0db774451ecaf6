"""GPU engine: the app's Backend on CUDA, decode steps replayed from a CUDA graph."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from gpu_backend import availability, kv_options_for, schemes_for
from gpu_backend.model import GPUDecoder
from gpu_backend.weights import build_decoder, canonical_scheme, load_quantized_linears
from models.backend import Backend, RequestError, SamplingParams, TokenEvent
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import Generator
from models.registry import resolve

MAX_CONTEXT = 8192


def checkpoint_folder(model: str, scheme: str) -> Path:
    """The folder to load: quant's checkpoint for 8-bit schemes when quant offers one, else the BF16 model
    (whose linears are then quantized round-to-nearest at load)."""
    if scheme != "bf16":
        try:
            from quant import build  # the shared pipeline (calibration, SmoothQuant) when it is installed
        except ImportError:
            pass
        else:
            return Path(build(model, scheme))
    return resolve(model)


class GraphGenerator(Generator):
    """models.generate.Generator over a GPUDecoder: prefill eagerly, decode by graph replay."""

    def __init__(self, model: GPUDecoder, tokenizer, eos_ids: set[int]) -> None:  # noqa: D107
        # the base class would allocate a models.decoder KV cache; ours lives in the GPUDecoder
        self.model, self.tokenizer, self.eos_ids, self.device = model, tokenizer, set(eos_ids), "cuda"
        self.lock = threading.Lock()
        self._pos = torch.zeros(1, dtype=torch.int32, device="cuda")
        self._tok = torch.zeros(1, dtype=torch.long, device="cuda")

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(ids.to("cuda"))[0]

    def decode(self, token: int, pos: int) -> torch.Tensor:
        self._tok.fill_(token)
        self._pos.fill_(pos)
        return self.model.decode(self._tok, self._pos)[0]


class GPUEngine(Backend):
    name = "gpu"

    def __init__(
        self, model: str, scheme: str = "bf16", kv_cache: str = "bf16", max_context: int = MAX_CONTEXT
    ) -> None:
        ok, why = availability()
        if not ok:
            raise RequestError(f"the GPU backend is not available: {why}")
        cap = torch.cuda.get_device_capability()
        scheme = canonical_scheme(scheme)
        if scheme not in schemes_for(cap):
            raise RequestError(f"scheme {scheme!r} is not available on {torch.cuda.get_device_name()}; "
                               f"choose one of {', '.join(schemes_for(cap))}")
        if kv_cache not in kv_options_for(cap):
            options = ", ".join(kv_options_for(cap))
            raise RequestError(f"KV cache {kv_cache!r} is not available here; choose one of {options}")
        self.model_spec, self._scheme, self.kv_cache = model, scheme, kv_cache
        folder = checkpoint_folder(model, scheme)
        base = resolve(model)
        self.tokenizer = load_tokenizer(base)
        cfg = DecoderConfig.from_file(folder / "config.json")
        try:
            decoder = build_decoder(load_quantized_linears(folder), cfg, scheme, kv_cache)
        except ValueError as e:
            raise RequestError(str(e)) from e
        decoder.allocate(1, min(cfg.max_position_embeddings, max_context))
        decoder.decode_graph(1)  # capture now: before any prefill fills the cache
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.generator = GraphGenerator(decoder, self.tokenizer, eos)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return availability()

    @property
    def scheme(self) -> str:
        return self._scheme

    @property
    def context_length(self) -> int:
        return self.generator.max_len

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event | None = None
    ) -> Iterator[TokenEvent]:
        return self.generator.generate(prompt_ids, params, cancel)
