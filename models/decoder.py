"""A compact Llama-family decoder (Llama, Llama 3, Mistral, Qwen2) with a pre-allocated KV cache.

Parameter names follow Hugging Face's (``model.layers.0.self_attn.q_proj.weight``) so checkpoints
load without renaming. Every projection is a plain module with a ``weight`` of shape
[out_features, in_features]; a backend swaps them for quantized kernels with ``replace_linear``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config import DecoderConfig

LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def layer_prefix(i: int) -> str:
    """The checkpoint name prefix of decoder layer ``i`` (Hugging Face's Llama layout)."""
    return f"model.layers.{i}."


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not cfg.rope_scaling:
        return inv_freq
    # Llama 3.1: stretch low frequencies by `factor`, keep high ones, blend in between.
    s = cfg.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Keys and values of every layer, [layers, batch, kv_heads, max_len, head_dim], filled in place."""

    def __init__(
        self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One query token over the cache: q [b, H, 1, D], k/v [b, KV, S, D]. Grouped-query heads share keys.

    Two batched matmuls and a float32 softmax, in the cache's dtype: on CPU ~4x faster than SDPA's
    generic kernel at T=1 (and float32 matmuls beat BF16 ones at these tiny shapes).
    """
    b, n_heads, _, d = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.view(b, n_kv, n_heads // n_kv, d), k.transpose(-1, -2)) * d**-0.5
    probs = scores.float().softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, n_heads, 1, d)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        hidden, q_out, kv_out = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=False)
        self.split = (q_out, kv_out, kv_out)
        self.qkv_proj: nn.Module | None = None  # set by Decoder.fuse_projections

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = cache.update(self.layer, start, k.to(cache.k.dtype), v.to(cache.v.dtype))
        if t == 1:
            out = decode_attention(q.to(k.dtype), k, v).to(q.dtype)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
        k, v = k.to(q.dtype), v.to(q.dtype)
        if start == 0:
            mask, causal = None, True
        else:  # a chunk appended after cached tokens: query i sees keys up to start + i
            keys = torch.arange(start + t, device=x.device)
            mask, causal = keys[None, :] <= (start + torch.arange(t, device=x.device))[:, None], False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # set by Decoder.fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def linear_names(self) -> list[str]:
        """Names of the projections a quantizer or backend may replace (lm_head excluded)."""
        return [layer_prefix(i) + s for i in range(self.config.num_layers) for s in LINEAR_SUFFIXES]

    def replace_linear(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent_name), child, module)

    def fuse_projections(self, fuse: Callable[[list[nn.Module]], nn.Module]) -> None:
        """Replace q/k/v and gate/up by one module each (they read the same input): fewer, larger GEMMs.

        ``fuse`` receives the source projections in output order and returns the fused module, or
        None when they cannot be fused (they then stay separate). Backends call this after loading.
        """
        for layer in self.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            if qkv is not None:
                attn.qkv_proj = qkv
                del attn.q_proj, attn.k_proj, attn.v_proj
            gate_up = fuse([mlp.gate_proj, mlp.up_proj])
            if gate_up is not None:
                mlp.gate_up_proj = gate_up
                del mlp.gate_proj, mlp.up_proj

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        max_len = min(max_len, self.config.max_position_embeddings)
        return KVCache(self.config, batch, max_len, dtype or self.model.norm.weight.dtype, self.inv_freq.device)

    def rope(self, start: int, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._rope_cache
        if cached is None or cached[0].shape[0] < start + length or cached[0].dtype != dtype:
            n = max(start + length, min(self.config.max_position_embeddings, 4096))
            freqs = torch.outer(
                torch.arange(n, device=self.inv_freq.device, dtype=torch.float32), self.inv_freq.float()
            )
            emb = torch.cat((freqs, freqs), dim=-1)
            cached = self._rope_cache = (emb.cos().to(dtype), emb.sin().to(dtype))
        return cached[0][start : start + length], cached[1][start : start + length]

    def forward(self, tokens: torch.Tensor, cache: KVCache, start: int, last_only: bool = False) -> torch.Tensor:
        """Logits (float32) for ``tokens`` [batch, T] placed at positions start..start+T-1."""
        if start + tokens.shape[1] > cache.max_len:
            raise ValueError(f"sequence of {start + tokens.shape[1]} tokens exceeds the KV cache ({cache.max_len})")
        x = self.model.embed_tokens(tokens)
        cos, sin = self.rope(start, tokens.shape[1], x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, cache, start)
        x = self.model.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x).float()
