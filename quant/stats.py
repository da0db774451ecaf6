"""Activation statistics, collected layer by layer with forward hooks and cached on disk.

For every projection input: the abs-max of each input channel, the mean and max of the per-token
abs-max; for every layer: the abs-max of keys (after RoPE, as cached) and values per KV head.
Only running reductions are kept, never activations. The hidden states of all samples are pushed
through one layer at a time, so a large model needs its weights plus one [samples, tokens, hidden]
tensor, not per-layer activations.

Cache: ``$Q8CHAT_CACHE/stats/<key>.safetensors`` with ``key = sha256(model hash, token ids, shape)``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from models.decoder import LINEAR_SUFFIXES, Decoder, layer_prefix
from models.registry import cache_dir, file_digest
from models.weights import weight_files
from quant import progress as build_progress

STATS_VERSION = "2"


class PassThroughCache:
    """Stands in for the decoder's KV cache during calibration: stores nothing, shows k/v to a callback."""

    def __init__(self, dtype: torch.dtype, on_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None):
        self.k = self.v = torch.empty(0, dtype=dtype)
        self.max_len = 1 << 30
        self.on_kv = on_kv

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.on_kv is not None:
            self.on_kv(layer, k, v)
        return k, v


def run_layers(
    model: Decoder, samples: torch.Tensor, batch_size: int = 8, stage: str = "calibration",
    on_kv: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None, show: bool = False,
) -> Iterator[tuple[int, nn.Module, Callable[[], None]]]:
    """Yield (index, layer, run) per decoder layer; ``run()`` pushes every sample's hidden state through it.

    Hooks a caller attaches to the layer before calling ``run()`` see every calibration token. Each layer is
    reported to ``quant.progress`` as ``stage``; ``show`` also draws a terminal progress bar.
    """
    dtype = model.model.embed_tokens.weight.dtype
    cache = PassThroughCache(dtype, on_kv)
    with torch.inference_mode():
        hidden = [model.model.embed_tokens(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
        cos, sin = model.rope(0, samples.shape[1], dtype)
    layers = list(enumerate(model.model.layers))
    for i, layer in tqdm(layers, desc=stage, disable=not show, unit="layer"):
        build_progress.report(stage, i, len(layers))

        def run(layer=layer) -> None:
            with torch.inference_mode():
                for j, h in enumerate(hidden):
                    hidden[j] = layer(h, cos, sin, cache, 0)

        yield i, layer, run


@dataclass
class Stats:
    """Flat tensors: ``<linear>.input_absmax`` [in], ``<linear>.token_absmax_mean`` / ``_max`` [],
    ``model.layers.N.self_attn.k_absmax`` / ``v_absmax`` [kv_heads, head_dim]; plus metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def input_absmax(self, linear: str) -> torch.Tensor:
        return self.tensors[f"{linear}.input_absmax"]

    def kv_absmax(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Abs-max of keys (after RoPE) and values per KV head and channel, [kv_heads, head_dim] each."""
        p = layer_prefix(layer) + "self_attn"
        return self.tensors[f"{p}.k_absmax"], self.tensors[f"{p}.v_absmax"]


def collect_stats(model: Decoder, samples: torch.Tensor, batch_size: int = 8, progress: bool = True) -> Stats:
    """Run ``samples`` [n, seq_len] through ``model`` layer by layer and reduce the statistics."""
    out: dict[str, torch.Tensor] = {}
    token_sum: dict[str, float] = {}
    token_count: dict[str, int] = {}

    def on_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:  # [b, kv_heads, t, head_dim]
        for tag, x in (("k", k), ("v", v)):
            name = f"{layer_prefix(layer)}self_attn.{tag}_absmax"
            amax = x.detach().abs().float().amax(dim=(0, 2))  # [kv_heads, head_dim]
            out[name] = torch.maximum(out[name], amax) if name in out else amax

    def hook(name: str):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1])
            ch, tok = a.amax(0), a.amax(1)
            key = f"{name}.input_absmax"
            out[key] = torch.maximum(out[key], ch) if key in out else ch
            mkey = f"{name}.token_absmax_max"
            out[mkey] = torch.maximum(out[mkey], tok.max()) if mkey in out else tok.max()
            token_sum[name] = token_sum.get(name, 0.0) + float(tok.sum())
            token_count[name] = token_count.get(name, 0) + tok.numel()

        return pre_hook

    for i, layer, run in run_layers(model, samples, batch_size, "activation statistics", on_kv, show=progress):
        handles = [
            layer.get_submodule(s).register_forward_pre_hook(hook(layer_prefix(i) + s)) for s in LINEAR_SUFFIXES
        ]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
    for name, total in token_sum.items():
        out[f"{name}.token_absmax_mean"] = torch.tensor(total / token_count[name])
    return Stats(out, {"samples": str(samples.shape[0]), "seq_len": str(samples.shape[1])})


def model_hash(folder: str | Path) -> str:
    """sha256 over config.json and the weight files (memoized by path, size and mtime)."""
    folder = Path(folder)
    files = [folder / "config.json", *weight_files(folder)]
    memo_path = cache_dir() / "stats" / "model_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in memo:
            memo[key] = file_digest(f)
        h.update(f"{f.name}:{memo[key]}\n".encode())
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo_path.with_suffix(f".{id(memo)}.tmp")
    tmp.write_text(json.dumps(memo, indent=0))
    tmp.replace(memo_path)
    return h.hexdigest()


def stats_key(model_digest: str, samples: torch.Tensor) -> str:
    h = hashlib.sha256(f"v{STATS_VERSION}|{model_digest}|{tuple(samples.shape)}|".encode())
    h.update(samples.to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def stats_path(key: str) -> Path:
    return cache_dir() / "stats" / f"{key}.safetensors"


def save_stats(stats: Stats, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in stats.tensors.items()}, str(tmp), metadata=stats.meta)
    tmp.replace(path)


def load_stats(path: Path) -> Stats | None:
    """The cached statistics at ``path``, or None when absent or unreadable (they are then recomputed)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return Stats({k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}))
    except (SafetensorError, OSError, RuntimeError):
        return None


def cached_stats(
    model: Decoder, folder: str | Path, samples: torch.Tensor, data: str = "wiki", batch_size: int = 8,
    progress: bool = True,
) -> tuple[Stats, bool]:
    """(statistics, cache_hit): reuse the cached statistics for (model, samples) or collect and store them."""
    key = stats_key(model_hash(folder), samples)
    path = stats_path(key)
    stats = load_stats(path)
    if stats is not None and stats.meta.get("key") == key:
        return stats, True
    stats = collect_stats(model, samples, batch_size, progress)
    stats.meta.update({"key": key, "data": str(data), "version": STATS_VERSION})
    save_stats(stats, path)
    return stats, False
