"""CPU engine: our decoder on BF16 or INT8 linears (C++ GEMVs for decode, oneDNN for prefill), a lean decode loop."""

from __future__ import annotations

from pathlib import Path

import torch

from cpu_backend import kernels
from cpu_backend.linear import LINEAR_METHODS, BF16Linear, fuse_int8
from cpu_backend.threads import configure_threads
from models.backend import RequestError
from models.chat import load_tokenizer
from models.decoder import Decoder, layer_prefix
from models.generate import Generator, GeneratorBackend
from models.registry import resolve
from models.weights import load_decoder, parameter_count
from quant.schemes import DEFAULT_SCHEME, REGISTRY, SchemeError, get_scheme

MAX_CONTEXT = 8192


class CPUEngine(GeneratorBackend):
    name = "cpu"

    def __init__(
        self,
        model: str,
        scheme: str = DEFAULT_SCHEME,
        threads: int | None = None,
        max_context: int = MAX_CONTEXT,
        checkpoint: str | Path | None = None,
    ) -> None:
        """``checkpoint``: a built quantized checkpoint folder; by default ``quant.build`` makes or reuses one."""
        check_scheme(scheme)
        super().__init__(scheme)
        self.threads = configure_threads(threads)
        self.model_spec = model
        if not get_scheme(scheme).quantizes_weights:
            folder = resolve(model)
            decoder = load_decoder(folder, dtype=torch.bfloat16)
            pack_bf16(decoder)
        else:
            folder = Path(checkpoint) if checkpoint else build_checkpoint(model, scheme)
            decoder = load_quantized(folder, scheme)
        self.tokenizer = load_tokenizer(folder)
        self.eos_ids = set(decoder.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self._context = min(decoder.config.max_position_embeddings, max_context)
        # KV cache: bf16 for the C++ decode step, which reads it as float32 (the cache holds bf16 values either
        # way: half the bytes, the same arithmetic); float32 for the ATen step, whose attention matmuls run
        # faster in float32 than in BF16 at decode shapes
        cache_dtype = torch.bfloat16 if cpp_step_runs(decoder) else torch.float32
        self.generator = CPUGenerator(decoder, self._context, cache_dtype=cache_dtype)

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return True, ""

    @classmethod
    def supported_schemes(cls) -> tuple[str, ...]:
        """Every scheme whose formats have a CPU linear method (each one runs on any x86-64; AVX-512 VNNI/BF16
        and AMX make them fast, see cpu_backend.kernels)."""
        return tuple(s.name for s in REGISTRY.values() if s.formats in LINEAR_METHODS)

    @classmethod
    def load_bytes(cls, model: str, scheme: str) -> int:
        """The weights at the bytes the CPU linear methods hold per weight (some keep a prefill copy too)."""
        check_scheme(scheme)
        return parameter_count(resolve(model)) * LINEAR_METHODS[get_scheme(scheme).formats].bytes_per_weight


def check_scheme(scheme: str) -> None:
    try:
        formats = get_scheme(scheme).formats
    except SchemeError as e:
        raise RequestError(str(e)) from None
    if formats not in LINEAR_METHODS:
        why = "FP8 has no CPU kernels here; it runs on the GPU backend" if "float" in formats else "no CPU kernels"
        choices = ", ".join(CPUEngine.supported_schemes())
        raise RequestError(f"scheme {scheme!r} is not available on CPU ({why}); choose one of {choices}")


class CPUGenerator(Generator):
    """The shared Generator with a lean decode step: the decoder's own ops for one token, minus the Python glue.

    2-D activations, per-layer cache views made once, no module hooks; where the CPU has AVX-512, the ops between
    the GEMVs are C++ calls (``_decode_cpp``: residual add + RMSNorm, RoPE + cache write + attention, silu * up;
    the decoder's elementwise rounding bit for bit, but sums in their own order and our exp, so logits stay
    within a few bf16 steps of the decoder's). Elsewhere the decoder's math in ATen ops, bit-exact with
    ``Decoder.forward`` at T=1 (``rotate_half(x) * sin`` equals ``roll(x) * [-sin_lo, sin_hi]`` bit for bit).
    Tests assert both.
    """

    def __init__(self, model: Decoder, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        layers = model.model.layers
        self.projections_fused = all(
            ly.self_attn.qkv_proj is not None and ly.mlp.gate_up_proj is not None for ly in layers
        )
        cfg = model.config
        self.k_views = [self.cache.k[i, 0] for i in range(cfg.num_layers)]  # [kv_heads, max_len, head_dim]
        self.v_views = [self.cache.v[i, 0] for i in range(cfg.num_layers)]
        self.plan = None  # the C++ decode step (made on first use)
        self.cpp_step = cpp_step_runs(model) and self.cache.k.dtype == torch.bfloat16

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        if not (self.projections_fused and self.cpp_step and ids.shape[0] == 1):
            return super().prefill(ids, start)
        return self._prefill_cpp(ids[0], start)

    def _prefill_cpp(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """The decoder's prefill with csrc/decode.cpp's row ops between the GEMMs (residual add + RMSNorm, RoPE +
        cache write, silu * up: one pass each instead of ~25 ATen ops per layer) and the decoder's own attention
        (SDPA over the cache). Elementwise rounding as the decoder's; the norm's sums in their own order."""
        model, cfg = self.model, self.model.config
        t, d, eps = ids.shape[0], cfg.head_dim, cfg.rms_norm_eps
        end = start + t
        if end > self.cache.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache ({self.cache.max_len})")
        x = model.model.embed_tokens(ids)  # [t, hidden]
        cos, sin = model.rope(start, t, x.dtype)
        sin = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), -1)
        gqa = cfg.num_kv_heads != cfg.num_heads
        mask = None  # causal from 0; after cached tokens, query i sees keys up to start + i (as Decoder.forward)
        if start:
            mask = torch.arange(end)[None, :] <= (start + torch.arange(t))[:, None]
        delta = None
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x, h = kernels.add_rmsnorm(x, delta, layer.input_layernorm.weight, eps)
            q = kernels.rope_rows(attn.qkv_proj(h), cos, sin, self.k_views[i], self.v_views[i], start, cfg.num_heads)
            k, v = self.k_views[i][None, :, :end], self.v_views[i][None, :, :end]
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None], k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
            )
            x, h = kernels.add_rmsnorm(x, attn.o_proj(out[0].transpose(0, 1).reshape(t, -1)),
                                       layer.post_attention_layernorm.weight, eps)  # fmt: skip
            delta = mlp.down_proj(kernels.silu_mul(mlp.gate_up_proj(h)))
        x, h = kernels.add_rmsnorm(x[-1:].contiguous(), delta[-1:].contiguous(), model.model.norm.weight, eps)
        return model.lm_head(h).float()[0]

    @torch.inference_mode()
    def decode(self, token: int, pos: int) -> torch.Tensor:
        if not self.projections_fused:
            return super().decode(token, pos)
        model, cfg = self.model, self.model.config
        if pos + 1 > self.cache.max_len:
            raise ValueError(f"sequence of {pos + 1} tokens exceeds the KV cache ({self.cache.max_len})")
        d = cfg.head_dim
        x = model.model.embed_tokens.weight[token : token + 1]  # [1, hidden]
        cos, sin = model.rope(pos, 1, x.dtype)  # [1, d]
        sin = torch.cat((-sin[:, : d // 2], sin[:, d // 2 :]), -1)
        if self.cpp_step:
            return self._decode_cpp(x, cos, sin, pos)
        for i, layer in enumerate(model.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = attn.qkv_proj(layer.input_layernorm.forward(x))
            x = x + attn.o_proj(self._attention(qkv, cos, sin, i, pos))
            gate, up = mlp.gate_up_proj(layer.post_attention_layernorm.forward(x)).chunk(2, dim=-1)
            x = x + mlp.down_proj(torch.nn.functional.silu(gate) * up)
        return model.lm_head(model.model.norm.forward(x)).float()[0]

    def _decode_cpp(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int) -> torch.Tensor:
        """The whole step as one C++ call (csrc/decode.cpp's DecodePlan, built on first use): per layer residual
        add + RMSNorm, the linears' own GEMVs, RoPE + cache write + attention, silu * up; then the LM head."""
        if self.plan is None:
            self.plan = build_plan(self.model, self.k_views, self.v_views)
        return self.plan.step(x, cos[0], sin[0], pos).float()[0]

    def _attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, i: int, pos: int) -> torch.Tensor:
        """``kernels.rope_attend`` in ATen ops (CPUs without AVX-512, other cache dtypes): the decoder's math."""
        cfg = self.model.config
        n_heads, n_kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = n_heads * d, n_kv * d
        qk = qkv[:, : q_out + kv_out].view(n_heads + n_kv, d)
        qk = qk * cos + qk.roll(d // 2, -1) * sin
        kc, vc = self.k_views[i], self.v_views[i]
        kc[:, pos].copy_(qk[n_heads:])
        vc[:, pos].copy_(qkv[0, q_out + kv_out :].view(n_kv, d))
        k, v = kc[:, : pos + 1], vc[:, : pos + 1]
        q = qk[:n_heads].to(k.dtype).view(n_kv, n_heads // n_kv, d)
        probs = (torch.matmul(q, k.transpose(-1, -2)) * d**-0.5).float().softmax(-1).to(v.dtype)
        return torch.matmul(probs, v).to(qkv.dtype).view(1, q_out)


def cpp_step_runs(model: Decoder) -> bool:
    """Whether the C++ decode step (csrc/decode.cpp: DecodePlan) runs ``model`` on this CPU: AVX-512, head_dim 64 or
    128, bf16 norms, fused q/k/v and gate/up, and a one-row kernel for every linear and the LM head."""
    layers = model.model.layers
    norms = [n.weight for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    linears = [model.lm_head]
    for ly in layers:
        linears += [ly.self_attn.qkv_proj, ly.self_attn.o_proj, ly.mlp.gate_up_proj, ly.mlp.down_proj]
    return (
        kernels.has_avx512()
        and model.config.head_dim in (64, 128)
        and all(w.dtype == torch.bfloat16 for w in [*norms, model.model.norm.weight])
        and all(hasattr(m, "plan_args") and m.plan_args() is not None for m in linears)
    )


def build_plan(model: Decoder, k_views: list[torch.Tensor], v_views: list[torch.Tensor]):
    """The model's decode step as a C++ DecodePlan over its tensors (no copies) and the generator's bf16 cache."""
    kernels.load()
    cfg = model.config
    plan = torch.classes.q8chat.DecodePlan(cfg.num_heads, cfg.rms_norm_eps)
    for layer, k, v in zip(model.model.layers, k_views, v_views, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            plan.add_linear(*linear.plan_args())
        plan.add_norm(layer.input_layernorm.weight)
        plan.add_norm(layer.post_attention_layernorm.weight)
        plan.add_cache(k, v)
    plan.add_linear(*model.lm_head.plan_args())
    plan.add_norm(model.model.norm.weight)
    return plan


def build_checkpoint(model: str, scheme: str) -> Path:
    """The shared pipeline's checkpoint for (model, scheme): built once (calibration + SmoothQuant), then cached."""
    import quant

    return quant.build(model, scheme)


def pack_bf16(decoder: Decoder) -> None:
    """Fuse q/k/v and gate/up, then put every projection and the LM head on BF16Linear."""
    decoder.fuse_projections(BF16Linear.fused)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        for i in range(decoder.config.num_layers):
            full = layer_prefix(i) + name
            decoder.replace_linear(full, BF16Linear.from_linear(decoder.get_submodule(full)))
    decoder.lm_head = BF16Linear.from_linear(decoder.lm_head, prefill_copy=False)


def load_quantized(folder: Path, scheme: str) -> Decoder:
    """A quantized checkpoint on the CPU linear method of its scheme; linears the quantizer kept in BF16 stay BF16."""
    from quant.checkpoint import load_checkpoint
    from quant.reference import reference_decoder

    ckpt = load_checkpoint(folder)
    if ckpt.scheme.name != scheme:
        raise RequestError(f"{folder} holds a {ckpt.scheme.name} checkpoint, not {scheme}")
    if ckpt.scheme.kv_cache != "none":
        raise RequestError(f"{folder}: a quantized KV cache ({ckpt.scheme.kv_cache}) is not supported on CPU yet")
    decoder = reference_decoder(ckpt, dtype=torch.bfloat16)  # embeddings, norms, LM head; linears replaced below
    method = LINEAR_METHODS[ckpt.scheme.formats]
    for name in decoder.linear_names():
        weight, weight_scale, input_scale = ckpt.linear(name)
        bias = ckpt.tensors.get(f"{name}.bias")
        if weight_scale is None:
            module = BF16Linear(weight, bias)
        else:
            module = method.create(weight, weight_scale, input_scale, bias)
        decoder.replace_linear(name, module)
    decoder.fuse_projections(fuse_int8)
    decoder.lm_head = BF16Linear.from_linear(decoder.lm_head, prefill_copy=False)
    return decoder
