"""Our Llama-family decoder on CUDA: fused projections, 8-bit linears, a static KV cache, and one CUDA
graph per decode batch size.

It runs the weights of ``models.decoder.Decoder`` (same names, same math) but owns its forward: the
attention reads a fixed-shape cache at positions held in device tensors, so a captured decode step is
valid for every position. q|k|v and gate|up are fused into one GEMM each (per-channel weight scales
concatenate exactly). With 8-bit weights the elementwise steps between the decode GEMMs live inside
the kernels around them: the attention merge accumulates the o projection's input amax and the o GEMM
quantizes on load; the gate_up GEMM (rows interleaved gate/up) writes silu(gate) * up and its amax, and
the down GEMM quantizes on load (``GPUDecoder.fuse``, opt-in: Q8CHAT_GPU_FUSE).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpu_backend.kernels.act_quant import norm_quant, silu_mul_quant
from gpu_backend.kernels.attention import decode_attention, decode_splits, decode_workspace, rope_and_cache
from gpu_backend.kernels.gemm import SMALL_M, Fusion, gemm, w8a8
from models.config import DecoderConfig
from models.decoder import rope_inv_freq

FP8 = torch.float8_e4m3fn
FUSIBLE = ("oquant", "silu")


def _env_fuse() -> tuple[str, ...]:
    """Q8CHAT_GPU_FUSE: the steps fused into the GEMMs ("oquant,silu", "all"; default none). Opt-in until a
    device run has timed them against the separate kernels (bench/gpu_latency.py captures both)."""
    raw = os.environ.get("Q8CHAT_GPU_FUSE", "").strip().lower()
    if raw == "all":
        return FUSIBLE
    steps = tuple(x.strip() for x in raw.split(",") if x.strip())
    bad = [x for x in steps if x not in FUSIBLE]
    if bad:
        raise ValueError(f"Q8CHAT_GPU_FUSE: unknown steps {bad}; choose from {', '.join(FUSIBLE)} or 'all'")
    return steps


def _env_splits() -> int | None:
    """Q8CHAT_GPU_ATTN_SPLITS: decode-attention key slices, a power of 2, or "auto" (per batch size); default 16
    (the measured setting; "auto" is opt-in until timed)."""
    raw = os.environ.get("Q8CHAT_GPU_ATTN_SPLITS", "16").strip().lower()
    if raw == "auto":
        return None
    if not raw.isdigit() or int(raw) < 1 or int(raw) & (int(raw) - 1):
        raise ValueError(f"Q8CHAT_GPU_ATTN_SPLITS={raw!r}: use a power of 2 (1 ... 64) or 'auto'")
    return int(raw)


# prompt lengths a batch-1 prefill graph is captured for (a prompt runs in the smallest that holds it: at most
# 1.5x the work of its own length past 256 tokens)
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


@dataclass
class Linear:
    """One projection: bf16 weight, or 8-bit weight [N, K] + per-channel scale [N] (+ static input scale)."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    act_dtype: torch.dtype | None = None  # int8/fp8 for W8A8; None: bf16 activations
    interleaved: bool = False  # gate_up rows as gate_0 up_0 gate_1 up_1 ... (see ``interleave_halves``)

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor | None, amax: torch.Tensor | None = None) -> torch.Tensor:
        """a: quantized with ``a_scale``, or bf16 (a_scale None) for a W8A8 linear to quantize itself: on load
        inside our GEMM at decode sizes when the row ``amax`` (from the producer) or a static scale is known,
        else by a quantization kernel first."""
        if self.scale is None:
            return F.linear(a, self.weight, self.bias)
        if self.act_dtype is None:
            return gemm(a, None, self.weight, self.scale, self.bias)
        if a_scale is None:
            static = self.input_scale is not None
            if a.shape[0] <= SMALL_M and (amax is not None or static):
                fusion = Fusion(self.act_dtype, self.input_scale if static else amax, static)
                return gemm(a, None, self.weight, self.scale, self.bias, fusion=fusion)
            a, a_scale = norm_quant(a, None, qdtype=self.act_dtype, static_scale=self.input_scale)
        return w8a8(a, a_scale, self.weight, self.scale, self.bias)

    def silu(
        self, a: torch.Tensor, a_scale: torch.Tensor | None, amax_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An interleaved gate_up: silu(gate) * up in bf16 [M, N/2] and its row amax (None where the GEMM was
        cuBLAS, FP8 prefill: then a separate kernel pairs the columns and the consumer quantizes itself)."""
        assert self.interleaved and self.scale is not None
        if self.act_dtype is None:
            a_scale = None  # weight-only: the norm kernel's bf16 output carries no scale
        if self.act_dtype == FP8 and a.shape[0] > SMALL_M and a.is_cuda:
            m, _ = silu_mul_quant(w8a8(a, a_scale, self.weight, self.scale, self.bias), None, interleaved=True)
            return m, None
        fusion = Fusion(silu=True, amax_out=amax_out)
        return gemm(a, a_scale, self.weight, self.scale, self.bias, fusion=fusion), amax_out

    def interleave_halves(self) -> Linear:
        """gate|up rows reordered gate_0 up_0 gate_1 up_1 ..., so that a GEMM tile holds both factors of each
        output of silu(gate) * up (its epilogue computes it)."""

        def mix(t):
            return None if t is None else torch.stack(t.chunk(2, dim=0), dim=1).flatten(0, 1).contiguous()

        return Linear(mix(self.weight), mix(self.scale), self.input_scale, mix(self.bias), self.act_dtype, True)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    @staticmethod
    def fusible(parts: list[Linear]) -> bool:
        """One GEMM computes exactly what the parts compute: same weight and activation types, and (static
        activations) the same input scale, so that one quantized activation feeds them all."""
        p0 = parts[0]
        if any(
            (p.scale is None) != (p0.scale is None)
            or p.act_dtype != p0.act_dtype
            or (p.bias is None) != (p0.bias is None)
            or (p.scale is not None and p.weight.dtype != p0.weight.dtype)
            for p in parts
        ):
            return False
        if p0.input_scale is None:
            return all(p.input_scale is None for p in parts)
        return all(p.input_scale is not None and torch.equal(p.input_scale, p0.input_scale) for p in parts)

    @staticmethod
    def fuse(parts: list[Linear]) -> Linear | UnfusedLinears:
        """One GEMM when ``fusible`` (per-channel weight scales concatenate exactly), else ``UnfusedLinears``."""
        if not Linear.fusible(parts):
            return UnfusedLinears(parts)

        def cat(xs):
            return None if xs[0] is None else torch.cat(xs)

        return Linear(
            cat([p.weight for p in parts]),
            cat([p.scale for p in parts]),
            parts[0].input_scale,
            cat([p.bias for p in parts]),
            parts[0].act_dtype,
        )


class UnfusedLinears:
    """Projections that read one input but cannot share a GEMM (e.g. some kept in BF16 by the quantizer, or
    different static input scales): one GEMM each, each quantizing the BF16 input its own way; their outputs
    are concatenated (the q|k|v or gate|up a fused Linear would return)."""

    act_dtype = None  # the caller hands over the BF16 (normed) input
    input_scale = None

    def __init__(self, parts: list[Linear]) -> None:
        self.parts = parts

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor | None, amax: torch.Tensor | None = None) -> torch.Tensor:
        outs = []
        for p in self.parts:
            if p.act_dtype is None:
                outs.append(p(a, None))
            else:
                q, qs = norm_quant(a, None, qdtype=p.act_dtype, static_scale=p.input_scale)
                outs.append(p(q, qs))
        return torch.cat([o.to(torch.bfloat16) for o in outs], dim=1)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass
class Layer:
    qkv: Linear | UnfusedLinears
    o: Linear
    gate_up: Linear | UnfusedLinears
    down: Linear
    ln1: torch.Tensor
    ln2: torch.Tensor
    k_scale: torch.Tensor  # [kv_heads] fp32 (ones for a bf16 cache)
    v_scale: torch.Tensor


class GPUDecoder:
    def __init__(
        self,
        cfg: DecoderConfig,
        embed: torch.Tensor,
        layers: list[Layer],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        act_dtype: torch.dtype | None,
        kv_dtype: torch.dtype = torch.bfloat16,
        attn_splits: int | str | None = "env",
    ) -> None:
        """attn_splits: key slices of the decode attention; None: per batch size (``decode_splits``); "env":
        from Q8CHAT_GPU_ATTN_SPLITS."""
        if attn_splits == "env":
            attn_splits = _env_splits()
        for lyr in layers:
            if isinstance(lyr.gate_up, Linear) and lyr.gate_up.scale is not None and not lyr.gate_up.interleaved:
                lyr.gate_up = lyr.gate_up.interleave_halves()  # our GEMMs run it: silu in their epilogue
        self.cfg, self.embed, self.layers, self.norm, self.lm_head = cfg, embed, layers, norm, lm_head
        self.act_dtype, self.kv_dtype, self.splits = act_dtype, kv_dtype, attn_splits
        # which elementwise steps run inside the GEMMs: "oquant" (the o projection's input quantization), "silu"
        # (silu(gate) * up and the down projection's input quantization); the others run as kernels of their
        # own (the benchmark captures the variants side by side)
        self.fuse: tuple[str, ...] = _env_fuse()
        self.device = embed.device
        self.max_batch = self.max_len = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.prefill_graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
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
        self.prefill_graphs.clear()

    def weight_bytes(self) -> int:
        per_layer = sum(lin.nbytes for lyr in self.layers for lin in (lyr.qkv, lyr.o, lyr.gate_up, lyr.down))
        return per_layer + self.lm_head.numel() * self.lm_head.element_size()

    def kv_bytes_read(self, batch: int, seq: int) -> int:
        c = self.cfg
        return 2 * len(self.layers) * batch * c.num_kv_heads * seq * c.head_dim * self.k_cache[0].element_size()

    def splits_for(self, bsz: int) -> int:
        if self.splits is not None:
            return self.splits
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.device.type == "cuda" else 8
        return decode_splits(bsz, self.cfg.num_kv_heads, sms)

    # -- forward ------------------------------------------------------------------------------
    def _layers(
        self, x: torch.Tensor, positions: torch.Tensor, bsz: int, t: int, seq_lens: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B*T, hidden] bf16 -> final normed hidden [B*T, hidden]. seq_lens given: decode (T = 1)."""
        c = self.cfg
        h_n, kv_n, d = c.num_heads, c.num_kv_heads, c.head_dim
        eps = c.rms_norm_eps
        delta = None
        decode = seq_lens is not None
        splits = self.splits_for(bsz) if decode else 0
        ws = decode_workspace(bsz, h_n, d, splits, x.device) if decode else None
        # row amax of the o input [layer, 0] and of silu(gate)*up [layer, 1], accumulated by their producers
        # (one memset per step, not one per layer)
        amax = (
            torch.zeros((len(self.layers), 2, x.shape[0]), dtype=torch.float32, device=x.device) if self.fuse else None
        )
        for i, lyr in enumerate(self.layers):
            h, hs = norm_quant(
                x, lyr.ln1, eps, residual=delta, qdtype=lyr.qkv.act_dtype, static_scale=lyr.qkv.input_scale
            )
            qkv = lyr.qkv(h, hs)
            kc, vc = self.k_cache[i][:bsz], self.v_cache[i][:bsz]
            rope_and_cache(qkv, positions, self.cos, self.sin, kc, vc, lyr.k_scale, lyr.v_scale, h_n, kv_n, t)
            fuse_o = decode and amax is not None and "oquant" in self.fuse and lyr.o.act_dtype is not None
            o_amax = amax[i, 0] if fuse_o else None
            if decode:
                attn = decode_attention(
                    qkv, kc, vc, lyr.k_scale, lyr.v_scale, seq_lens, h_n, splits=splits, workspace=ws, amax_out=o_amax
                )
            else:
                attn = self._prefill_attention(qkv, bsz, t)
            o = lyr.o(attn, None, amax=o_amax)  # a W8A8 o quantizes the bf16 attention output itself
            h, hs = norm_quant(
                x, lyr.ln2, eps, residual=o, qdtype=lyr.gate_up.act_dtype, static_scale=lyr.gate_up.input_scale
            )
            m, ms, m_amax = self._mlp_act(lyr, h, hs, amax[i, 1] if amax is not None and "silu" in self.fuse else None)
            delta = lyr.down(m, ms, amax=m_amax)
        h, _ = norm_quant(x, self.norm, eps, residual=delta)
        return h

    def _mlp_act(
        self, lyr: Layer, h: torch.Tensor, hs: torch.Tensor, amax: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """silu(gate) * up for the down projection: (values, their scale, their row amax): quantized with a
        scale by a kernel of its own, or bf16 with the amax the gate_up epilogue accumulated (down quantizes
        on load)."""
        gu, down = lyr.gate_up, lyr.down
        if amax is not None and isinstance(gu, Linear) and gu.interleaved:
            m, m_amax = gu.silu(h, hs, amax)
            return m, None, m_amax
        interleaved = isinstance(gu, Linear) and gu.interleaved
        m, ms = silu_mul_quant(gu(h, hs), down.act_dtype, static_scale=down.input_scale, interleaved=interleaved)
        return m, (ms if down.act_dtype is not None else None), None

    def _prefill_attention(self, qkv: torch.Tensor, bsz: int, t: int) -> torch.Tensor:
        """Causal attention over the prompt. k and v are read from ``qkv``, where ``rope_and_cache`` left what
        the cache holds (an 8-bit cache's values dequantized, as quant.reference attends to them)."""
        c = self.cfg
        h_n, kv_n, d = c.num_heads, c.num_kv_heads, c.head_dim
        q, k, v = qkv.view(bsz, t, h_n + 2 * kv_n, d).transpose(1, 2).split([h_n, kv_n, kv_n], dim=1)
        q, k, v = q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_n != h_n)
        return out.transpose(1, 2).reshape(bsz * t, h_n * d)

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return F.linear(h_last, self.lm_head).float()

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """tokens [B, T] (equal lengths, from position 0) -> last-token logits [B, vocab] float32
        (every position's, [B, T, vocab], with ``all_logits``)."""
        bsz, t = tokens.shape
        if bsz > self.max_batch or t > self.max_len:
            raise ValueError(f"prefill of {bsz}x{t} exceeds the allocated cache ({self.max_batch}x{self.max_len})")
        if bsz == 1 and not all_logits and self.device.type == "cuda":
            return self._prefill_graph(tokens)
        positions = torch.arange(t, device=self.device, dtype=torch.int32).repeat(bsz)
        x = self.embed[tokens.reshape(-1)]
        h = self._layers(x, positions, bsz, t, None)
        if all_logits:
            return self.logits(h).view(bsz, t, -1)
        return self.logits(h.view(bsz, t, -1)[:, -1])

    def _prefill_graph(self, tokens: torch.Tensor) -> torch.Tensor:
        """A chat prompt's prefill (batch 1) as the replay of a graph captured for its length bucket: the prompt
        padded at the end to the bucket (causal attention: the padding changes nothing before it; its cache
        slots are rewritten by the decode steps before they are read), logits of its last real token."""
        t = tokens.shape[1]
        size = next((b for b in PREFILL_BUCKETS if t <= b <= self.max_len), self.max_len)
        if size not in self.prefill_graphs:
            buf = {
                "tokens": torch.zeros(size, dtype=torch.long, device=self.device),
                "positions": torch.arange(size, dtype=torch.int32, device=self.device),
                "last": torch.zeros(1, dtype=torch.long, device=self.device),
                "logits": torch.zeros(1, self.cfg.vocab_size, dtype=torch.float32, device=self.device),
            }

            def run():
                h = self._layers(self.embed[buf["tokens"]], buf["positions"], 1, size, None)
                buf["logits"].copy_(self.logits(h.index_select(0, buf["last"])))

            self.prefill_graphs[size] = (self._capture(run), buf)
        graph, buf = self.prefill_graphs[size]
        buf["tokens"].zero_()
        buf["tokens"][:t].copy_(tokens[0])
        buf["last"].fill_(t - 1)
        graph.replay()
        return buf["logits"].clone()

    def _capture(self, run) -> torch.cuda.CUDAGraph:
        """``run`` warmed up (tiles picked, kernels compiled) on a side stream, then captured into the decoder's
        graph pool (graphs never run concurrently, and their outputs live in buffers made outside the pool)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            run()
        return graph

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
        # the warm-up writes the last two cache slots, which any sequence rewrites before it can read them
        buf["positions"].fill_(self.max_len - 2)
        buf["seq_lens"].fill_(self.max_len - 1)
        graph = self._capture(lambda: self._decode_eager(buf))
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


class EvalView:
    """The ``models.decoder.Decoder`` calls ``quant.evaluate.compare`` makes (``new_cache``, full-sequence
    forward from position 0), answered by a GPUDecoder: the GPU numerics in the quantizer's own evaluation."""

    def __init__(self, dec: GPUDecoder) -> None:
        self.dec = dec

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        if batch > self.dec.max_batch or max_len > self.dec.max_len:
            self.dec.allocate(max(batch, self.dec.max_batch), max(max_len, self.dec.max_len))

    def __call__(self, tokens: torch.Tensor, cache: None, start: int, last_only: bool = False) -> torch.Tensor:
        if start != 0:
            raise ValueError("EvalView scores whole windows from position 0")
        out = self.dec.prefill(tokens.to(self.dec.device), all_logits=not last_only)
        return (out[:, None] if last_only else out).cpu()
