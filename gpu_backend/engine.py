"""GPU engine: the app's Backend on CUDA, decode steps replayed from a CUDA graph."""

from __future__ import annotations

from pathlib import Path

import torch

from gpu_backend import availability, kv_options_for, schemes_for, supported_schemes
from gpu_backend.model import GPUDecoder
from gpu_backend.weights import build_decoder, build_from_checkpoint, load_quantized_linears
from models.backend import RequestError
from models.chat import load_tokenizer
from models.config import DecoderConfig
from models.generate import Generator, GeneratorBackend
from models.registry import resolve
from quant.schemes import DEFAULT_SCHEME, get_scheme

MAX_CONTEXT = 8192


def load_for_gpu(model: str, scheme: str, kv_cache: str | None, device: str = "cuda") -> tuple[GPUDecoder, Path]:
    """The GPU decoder for (model, scheme): BF16 from the model folder, a quantized scheme from the same
    ``quant.build`` checkpoint the CPU backend loads (cached, validated by ``quant.checkpoint.load_checkpoint``)."""
    if get_scheme(scheme).quantizes_weights:
        from quant import build
        from quant.checkpoint import load_checkpoint

        folder = Path(build(model, scheme))
        ckpt = load_checkpoint(folder, verify_hashes=False)  # build() has just validated it
        return build_from_checkpoint(ckpt, kv_cache, device), folder
    folder = resolve(model)
    cfg = DecoderConfig.from_file(folder / "config.json")
    return build_decoder(load_quantized_linears(folder), cfg, scheme, kv_cache or "bf16", device), folder


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
        """kv_cache: None = the checkpoint's KV scheme (calibrated scales) or bf16; "bf16", "fp8" or "int8"."""
        ok, why = availability()
        if not ok:
            raise RequestError(f"the GPU backend is not available: {why}")
        cap = torch.cuda.get_device_capability()
        if scheme not in schemes_for(cap):
            raise RequestError(
                f"scheme {scheme!r} is not available on {torch.cuda.get_device_name()}; "
                f"choose one of {', '.join(schemes_for(cap))}"
            )
        if kv_cache is not None and kv_cache not in kv_options_for(cap):
            options = ", ".join(kv_options_for(cap))
            raise RequestError(f"KV cache {kv_cache!r} is not available here; choose one of {options}")
        super().__init__(scheme)
        self.model_spec = model
        try:
            decoder, folder = load_for_gpu(model, scheme, kv_cache)
        except ValueError as e:  # CheckpointError and SchemeError are ValueErrors with a message that says what to do
            raise RequestError(str(e)) from e
        self.kv_cache = {torch.bfloat16: "bf16", torch.int8: "int8"}.get(decoder.kv_dtype, "fp8")
        if self.kv_cache not in kv_options_for(cap):
            raise RequestError(f"the checkpoint's {self.kv_cache} KV cache is not available on this GPU")
        self.tokenizer = load_tokenizer(folder)  # checkpoints carry the source tokenizer and chat template
        cfg = decoder.cfg
        self._context = min(cfg.max_position_embeddings, max_context)
        decoder.allocate(1, self._context)
        decoder.decode_graph(1)  # capture now: before any prefill fills the cache
        self.eos_ids = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.generator = GraphGenerator(decoder)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return availability()

    @classmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        return supported_schemes()
