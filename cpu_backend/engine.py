"""CPU engine: our decoder in BF16 with a lean decode loop."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from cpu_backend.linear import PackedBF16Linear
from cpu_backend.threads import configure_threads
from models.backend import Backend, RequestError, SamplingParams, TokenEvent
from models.chat import load_tokenizer
from models.decoder import Decoder
from models.generate import Generator
from models.registry import resolve
from models.weights import load_decoder

CPU_SCHEMES = ("bf16",)
MAX_CONTEXT = 8192


class CPUEngine(Backend):
    name = "cpu"
    SCHEMES = CPU_SCHEMES

    def __init__(
        self, model: str, scheme: str = "bf16", threads: int | None = None, max_context: int = MAX_CONTEXT
    ) -> None:
        if scheme not in CPU_SCHEMES:
            raise RequestError(f"scheme {scheme!r} is not available on CPU; choose one of {', '.join(CPU_SCHEMES)}")
        self.threads = configure_threads(threads)
        self.model_spec, self._scheme = model, scheme
        folder = resolve(model)
        self.tokenizer = load_tokenizer(folder)
        decoder = load_decoder(folder, dtype=torch.bfloat16)
        pack_bf16(decoder)
        eos = set(decoder.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        max_len = min(decoder.config.max_position_embeddings, max_context)
        # float32 KV cache: CPU attention matmuls at decode shapes run faster in float32 than in BF16
        self.generator = Generator(decoder, self.tokenizer, eos, max_len, cache_dtype=torch.float32)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""

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


def pack_bf16(decoder: Decoder) -> None:
    """Fuse q/k/v and gate/up, then put every projection and the LM head on prepacked oneDNN BF16 linears."""
    decoder.fuse_projections(PackedBF16Linear.fused)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        for i in range(decoder.config.num_layers):
            full = f"model.layers.{i}.{name}"
            decoder.replace_linear(full, PackedBF16Linear.from_linear(decoder.get_submodule(full)))
    decoder.lm_head = PackedBF16Linear.from_linear(decoder.lm_head)
