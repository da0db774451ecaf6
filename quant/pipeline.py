"""quantize(): model -> statistics -> SmoothQuant -> quantized weights -> checkpoint; build(): cached entry point."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import DecoderConfig
from models.decoder import LINEAR_SUFFIXES, Decoder, layer_prefix
from models.registry import cache_dir, resolve
from models.weights import load_decoder, read_tensors
from quant import progress as build_progress
from quant.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from quant.data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, calibration_samples
from quant.reference import quantize_weight
from quant.schemes import FP8_MAX, INT8_MAX, W8A8_INT8, Scheme, SchemeError, get_scheme
from quant.smooth import MAPPINGS, search_layer, smooth_layer
from quant.stats import Stats, cached_stats, model_hash, run_layers


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything that decides a checkpoint's contents."""

    model: str = "smollm2-135m"
    scheme: str = W8A8_INT8
    alpha: float | str = "auto"  # SmoothQuant strength (schemes that smooth): a number in [0, 1] (0 = naive) or "auto"
    kv_cache: str = "none"
    activations: str = "dynamic"  # int8 activations only: "static" stores a calibrated per-tensor input_scale
    data: str = "wiki"  # or a .txt / .jsonl file
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    search_samples: int = 8  # alpha=auto: samples whose activations score the grid ...
    search_tokens: int = 1024  # ... subsampled to this many tokens per layer
    batch_size: int = 8
    keep_bf16: tuple[str, ...] = field(default_factory=tuple)  # linears left unquantized (full names)
    int8_lm_head: bool = False  # the LM head too, as INT8 weights (int8-weight schemes)

    def validate(self) -> Scheme:
        scheme = get_scheme(self.scheme, self.kv_cache, self.activations, self.int8_lm_head)
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise SchemeError(f"alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise SchemeError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.samples < 1 or self.seq_len < 8 or self.search_samples < 1 or self.batch_size < 1:
            raise SchemeError("samples, search_samples and batch_size must be >= 1 and seq_len >= 8")
        return scheme

    @property
    def smoothing(self) -> bool:
        return get_scheme(self.scheme).smooth and self.alpha != 0 and self.alpha != 0.0


def _layer_tensors(src: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = layer_prefix(i)
    return {k[len(p):]: v.float() for k, v in src.items() if k.startswith(p)}


def auto_alphas(model: Decoder, cfg: DecoderConfig, stats: Stats, samples: torch.Tensor, scheme: Scheme,
                qc: QuantizeConfig, progress: bool) -> dict[int, dict[str, float]]:
    """Per layer and mapping, the grid alpha with the lowest quantized-block error on calibration tokens."""
    gen = torch.Generator().manual_seed(0)
    firsts = [m.linears[0] for m in MAPPINGS]
    out: dict[int, dict[str, float]] = {}
    for i, layer, run in run_layers(model, samples, qc.batch_size, "alpha search", show=progress):
        captured: dict[str, list[torch.Tensor]] = {s: [] for s in firsts}

        def hook(suffix: str, captured: dict[str, list[torch.Tensor]] = captured):
            def pre_hook(_m, args) -> None:
                captured[suffix].append(args[0].detach().reshape(-1, args[0].shape[-1]))
            return pre_hook

        handles = [layer.get_submodule(s).register_forward_pre_hook(hook(s)) for s in firsts]
        try:
            run()
        finally:
            for h in handles:
                h.remove()
        inputs = {}
        for s, parts in captured.items():
            x = torch.cat(parts)
            pick = torch.randperm(x.shape[0], generator=gen)[: qc.search_tokens]
            inputs[s] = x[pick].float()
        weights = {k: v.float() for k, v in layer.state_dict().items()}  # the model's own (BF16) weights
        out[i], _ = search_layer(cfg, i, weights, stats, inputs, scheme.activation_type, scheme.static_activations)
    return out


def calibrate(qc: QuantizeConfig, scheme: Scheme, folder: Path, cfg: DecoderConfig, progress: bool
              ) -> tuple[Stats | None, dict[int, dict[str, float]] | None, dict[str, Any]]:
    """Activation statistics and per-layer SmoothQuant alphas, as far as ``scheme`` needs them (+ manifest info)."""
    needs_stats = qc.smoothing or scheme.static_activations or scheme.kv_cache != "none"
    stats, alphas, info = None, None, {}
    if needs_stats:
        from models.chat import load_tokenizer

        tokenizer = load_tokenizer(folder)
        samples = calibration_samples(tokenizer, qc.samples, qc.seq_len, qc.data)
        model = load_decoder(folder, torch.bfloat16)
        stats, hit = cached_stats(model, folder, samples, qc.data, qc.batch_size, progress)
        info["calibration"] = {"data": qc.data, "samples": qc.samples, "seq_len": qc.seq_len,
                               "stats_key": stats.meta.get("key"), "stats_cache_hit": hit}
        if qc.smoothing and qc.alpha == "auto":
            alphas = auto_alphas(model, cfg, stats, samples[: qc.search_samples], scheme, qc, progress)
        del model  # one copy of the weights at a time: the calibration model, then the tensors to quantize
    if qc.smoothing and alphas is None:
        alphas = {i: {m.key: float(qc.alpha) for m in MAPPINGS} for i in range(cfg.num_layers)}
    info["alpha"] = qc.alpha if qc.smoothing else 0.0 if scheme.activation_type else None
    info["alphas"] = {str(i): a for i, a in alphas.items()} if alphas else None
    return stats, alphas, info


def quantize(qc: QuantizeConfig, out: str | Path, progress: bool = True) -> Path:
    """Build the checkpoint ``qc`` describes into the folder ``out`` (replaced if present)."""
    scheme = qc.validate()
    try:
        return _quantize(qc, scheme, out, progress)
    finally:
        build_progress.end()


def _quantize(qc: QuantizeConfig, scheme: Scheme, out: str | Path, progress: bool) -> Path:
    t0 = time.perf_counter()
    folder = resolve(qc.model)
    cfg = DecoderConfig.from_file(folder / "config.json")
    keep = [n for n in qc.keep_bf16]
    bad = sorted(set(keep) - {layer_prefix(i) + s for i in range(cfg.num_layers) for s in LINEAR_SUFFIXES})
    if bad:
        raise SchemeError(f"keep_bf16 names unknown linears, e.g. {bad[0]} (use model.layers.N.mlp.down_proj)")
    info: dict[str, Any] = {"source": {"model": qc.model, "folder": str(folder), "hash": model_hash(folder)},
                            "options": {k: v for k, v in asdict(qc).items() if k not in ("model", "scheme")}}
    stats, alphas, calibration = calibrate(qc, scheme, folder, cfg, progress)
    info.update(calibration)
    tensors = quantize_tensors(cfg, read_tensors(folder), scheme, stats, alphas, set(keep))
    info["quantize_seconds"] = round(time.perf_counter() - t0, 2)
    return save_checkpoint(out, tensors, folder, scheme, keep, info)


def quantize_tensors(cfg: DecoderConfig, src: dict[str, torch.Tensor], scheme: Scheme, stats: Stats | None,
                     alphas: dict[int, dict[str, float]] | None, keep_bf16: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors, one layer at a time in float32 (smoothing folded, then quantized)."""
    out = {k: v.to(torch.bfloat16) for k, v in src.items() if not k.startswith("model.layers.")}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.num_layers):
        build_progress.report("quantizing", i, cfg.num_layers)
        p = layer_prefix(i)
        layer = _layer_tensors(src, i)
        x_absmax = None
        if alphas is not None and stats is not None:
            x_absmax = smooth_layer(cfg, i, layer, stats, alphas[i])
        elif stats is not None and scheme.static_activations:
            x_absmax = {s: stats.input_absmax(p + s).float() for s in LINEAR_SUFFIXES}
        linear_weights = {f"{s}.weight" for s in LINEAR_SUFFIXES}
        for k, v in layer.items():
            name = p + k
            if k in linear_weights and scheme.quantizes_weights and name[: -len(".weight")] not in keep_bf16:
                module = name[: -len(".weight")]
                q, s = quantize_weight(v, scheme.weight_type)
                out[name], out[f"{module}.weight_scale"] = q, s
                if scheme.static_activations:
                    out[f"{module}.input_scale"] = (x_absmax[k[: -len(".weight")]].max() / INT8_MAX).reshape(1)
            else:
                out[name] = v.to(torch.bfloat16)
        if scheme.kv_cache != "none":
            qmax = INT8_MAX if scheme.kv_cache == "int8" else FP8_MAX
            k_amax, v_amax = stats.kv_absmax(i)
            if x_absmax is not None and "v_divisor" in x_absmax:  # v_proj rows were smoothed: so are values
                v_amax = v_amax.flatten() / x_absmax["v_divisor"]
            out[f"{p}self_attn.k_scale"] = (k_amax.max().clamp_min(1e-6) / qmax).reshape(1).float()
            out[f"{p}self_attn.v_scale"] = (v_amax.max().clamp_min(1e-6) / qmax).reshape(1).float()
    if scheme.int8_lm_head:  # from the tied embedding where there is no head of its own
        head = src["lm_head.weight"] if "lm_head.weight" in src else src["model.embed_tokens.weight"]
        out["lm_head.weight"], out["lm_head.weight_scale"] = quantize_weight(head, "int")
    return out


def default_out(qc: QuantizeConfig) -> Path:
    digest = hashlib.sha256(json.dumps(asdict(qc), sort_keys=True).encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(qc.model).name)
    alpha = f"-a{qc.alpha}" if qc.smoothing else ""
    kv = f"-kv{qc.kv_cache}" if qc.kv_cache != "none" else ""
    head = "-i8head" if qc.int8_lm_head else ""
    return cache_dir() / "checkpoints" / f"{slug}-{qc.scheme}{alpha}{kv}{head}-{digest}"


def build(model_spec: str, scheme: str, alpha: float | str = "auto", kv_cache: str = "none",
          out: str | Path | None = None, progress: bool = False, **options: Any) -> Path:
    """A validated checkpoint folder for (model, scheme, options): reused when already built, else quantized.

    ``options`` are further ``QuantizeConfig`` fields (samples, seq_len, data, activations, keep_bf16, ...).
    """
    qc = QuantizeConfig(model=model_spec, scheme=scheme, alpha=alpha, kv_cache=kv_cache, **options)
    qc.validate()
    target = Path(out) if out is not None else default_out(qc)
    if target.exists():
        try:
            ckpt = load_checkpoint(target)
            same = ckpt.manifest.get("source", {}).get("hash") == model_hash(resolve(model_spec))
            if same and ckpt.manifest.get("options") == json.loads(json.dumps(
                    {k: v for k, v in asdict(qc).items() if k not in ("model", "scheme")})):
                return target
        except CheckpointError:
            pass  # stale or broken: rebuild below
    return quantize(qc, target, progress=progress)
