"""Our Llama-family decoder on CUDA: fused projections, 8-bit linears, a static KV cache, and one CUDA
graph per decode batch size.

It runs the weights of ``models.decoder.Decoder`` (same names, same math) but owns its forward: the
attention reads a fixed-shape cache at positions held in device tensors, so a captured decode step is
valid for every position. q|k|v and gate|up are fused into one GEMM each (per-channel weight scales
concatenate exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_backend.kernels.act_quant import norm_quant, silu_mul_quant
from gpu_backend.kernels.attention import decode_attention, decode_workspace, rope_and_cache
from gpu_backend.kernels.gemm import gemm, w8a8
from models.config import DecoderConfig
from models.decoder import rope_inv_freq

FP8 = torch.float8_e4m3fn


@dataclass
class Linear:
    """One projection: bf16 weight, or 8-bit weight [N, K] + per-channel scale [N] (+ static input scale)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_dtype: torch.dtype | None = None  # int8/fp8 for W8A8; None: bf16 activations

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor | None) -> torch.Tensor:
        if self.scale is None:
            return F.linear(a, self.weight, self.bias)
        if self.act_dtype is None:
            return gemm(a, None, self.weight, self.scale, self.bias)
        return w8a8(a, a_scale, self.weight, self.scale, self.bias)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @staticmethod
    def fuse(parts: list[Linear]) -> Linear:
        def cat(xs):
            return None if xs[0] is None else torch.cat(xs)

        statics = [p.input_scale for p in parts]
        # one activation feeds all parts: the largest static scale covers each part's range
        input_scale = None if statics[0] is None else torch.stack([s.reshape(()) for s in statics]).max().reshape(1)
        return Linear(cat([p.weight for p in parts]), cat([p.scale for p in parts]), input_scale,
                      cat([p.bias for p in parts]), parts[0].act_dtype)


@dataclass
class Layer:
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    ln1: torch.Tensor
    ln2: torch.Tensor
    k_scale: torch.Tensor  # [kv_heads] fp32 (ones for a bf16 cache)
    v_scale: torch.Tensor


class GPUDecoder:
    def __init__(self, cfg: DecoderConfig, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 lm_head: torch.Tensor, act_dtype: torch.dtype | None, kv_dtype: torch.dtype = torch.bfloat16,
                 attn_splits: int = 16) -> None:
        self.cfg, self.embed, self.layers, self.norm, self.lm_head = cfg, embed, layers, norm, lm_head
        self.act_dtype, self.kv_dtype, self.splits = act_dtype, kv_dtype, attn_splits
        self.device = embed.device
        self.max_batch = self.max_len = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    # -- memory -------------------------------------------------------------------------------
    def allocate(self, max_batch: int, max_len: int) -> None:
        cfg = self.cfg
        max_len = min(max_len, cfg.max_position_embeddings)
        shape = (max_batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg).float())
        self.cos, self.sin = freqs.cos().to(self.device), freqs.sin().to(self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.graphs.clear()

    def weight_bytes(self) -> int:
        per_layer = sum(lin.nbytes for lyr in self.layers for lin in (lyr.qkv, lyr.o, lyr.gate_up, lyr.down))
        return per_layer + self.lm_head.numel() * self.lm_head.element_size()

    def kv_bytes_read(self, batch: int, seq: int) -> int:
        c = self.cfg
        return 2 * len(self.layers) * batch * c.num_kv_heads * seq * c.head_dim * self.k_cache[0].element_size()

    # -- forward ------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, positions: torch.Tensor, bsz: int, t: int,
                seq_lens: torch.Tensor | None) -> torch.Tensor:
        """x [B*T, hidden] bf16 -> final normed hidden [B*T, hidden]. seq_lens given: decode (T = 1)."""
        c = self.cfg
        h_n, kv_n, d = c.num_heads, c.num_kv_heads, c.head_dim
        act, eps = self.act_dtype, c.rms_norm_eps
        delta = None
        ws = decode_workspace(bsz, h_n, d, self.splits, x.device) if seq_lens is not None else None
        for i, lyr in enumerate(self.layers):
            h, hs = norm_quant(x, lyr.ln1, eps, residual=delta, qdtype=act, static_scale=lyr.qkv.input_scale)
            qkv = lyr.qkv(h, hs)
            kc, vc = self.k_cache[i][:bsz], self.v_cache[i][:bsz]
            rope_and_cache(qkv, positions, self.cos, self.sin, kc, vc, lyr.k_scale, lyr.v_scale, h_n, kv_n, t)
            if seq_lens is not None:
                attn = decode_attention(qkv, kc, vc, lyr.k_scale, lyr.v_scale, seq_lens, h_n,
                                        splits=self.splits, workspace=ws)
            else:
                attn = self._prefill_attention(qkv, bsz, t)
            a, as_ = (attn, None) if act is None else norm_quant(attn, None, qdtype=act,
                                                                  static_scale=lyr.o.input_scale)
            o = lyr.o(a, as_)
            h, hs = norm_quant(x, lyr.ln2, eps, residual=o, qdtype=act, static_scale=lyr.gate_up.input_scale)
            gu = lyr.gate_up(h, hs)
            m, ms = silu_mul_quant(gu, act, static_scale=lyr.down.input_scale)
            delta = lyr.down(m, ms)
        h, _ = norm_quant(x, self.norm, eps, residual=delta)
        return h

    def _prefill_attention(self, qkv: torch.Tensor, bsz: int, t: int) -> torch.Tensor:
        c = self.cfg
        h_n, kv_n, d = c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = qkv.view(bsz, t, h_n + 2 * kv_n, d).transpose(1, 2).split([h_n, kv_n, kv_n], dim=1)
        if kv_n != h_n:  # expand for the flash kernel (prefill only; decode reads the cache per kv head)
            k, v = k.repeat_interleave(h_n // kv_n, dim=1), v.repeat_interleave(h_n // kv_n, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(bsz * t, h_n * d)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.linear(h_last, self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] (equal lengths, from position 0) -> last-token logits [B, vocab] float32."""
        bsz, t = tokens.shape
        if bsz > self.max_batch or t > self.max_len:
            raise ValueError(f"prefill of {bsz}x{t} exceeds the allocated cache ({self.max_batch}x{self.max_len})")
        positions = torch.arange(t, device=self.device, dtype=torch.int32).repeat(bsz)
        x = self.embed[tokens.reshape(-1)]
        h = self._layers(x, positions, bsz, t, None)
        return self.logits(h.view(bsz, t, -1)[:, -1])

    # -- decode in CUDA graphs ----------------------------------------------------------------
    def _decode_eager(self, buf: dict[str, torch.Tensor]) -> None:
        bsz = buf["tokens"].shape[0]
        x = self.embed[buf["tokens"]]
        h = self._layers(x, buf["positions"], bsz, 1, buf["seq_lens"])
        logits = self.logits(h)
        buf["logits"].copy_(logits)
        # feed the greedy token back so that back-to-back replays generate on their own (benchmark);
        # the chat loop overwrites tokens/positions before every replay
        buf["tokens"].copy_(logits.argmax(-1))
        buf["positions"].add_(1)
        buf["seq_lens"].add_(1)

    @torch.inference_mode()
    def decode_graph(self, bsz: int) -> tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]:
        if bsz in self.graphs:
            return self.graphs[bsz]
        if bsz > self.max_batch:
            raise ValueError(f"batch {bsz} exceeds the allocated cache ({self.max_batch})")
        dev = self.device
        buf = {
            "tokens": torch.zeros(bsz, dtype=torch.long, device=dev),
            "positions": torch.zeros(bsz, dtype=torch.int32, device=dev),
            "seq_lens": torch.ones(bsz, dtype=torch.int32, device=dev),
            "logits": torch.zeros(bsz, self.cfg.vocab_size, dtype=torch.float32, device=dev),
        }
        # warm-up outside the capture: picks GEMM tiles and compiles every kernel for this shape. It
        # writes the last two cache slots, which any sequence rewrites before it can read them.
        buf["positions"].fill_(self.max_len - 2)
        buf["seq_lens"].fill_(self.max_len - 1)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._decode_eager(buf)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._decode_eager(buf)
        self.graphs[bsz] = (graph, buf)
        return graph, buf

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One step for tokens [B] at positions [B] (device tensors) -> logits [B, vocab] (a graph buffer)."""
        graph, buf = self.decode_graph(tokens.shape[0])
        buf["tokens"].copy_(tokens)
        buf["positions"].copy_(positions)
        torch.add(positions, 1, out=buf["seq_lens"])
        graph.replay()
        return buf["logits"]
