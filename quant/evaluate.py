"""Quality of a quantized checkpoint against the BF16 model on held-out Wikipedia text.

Windows: ``windows`` rows of ``window`` tokens cut from the evaluation split (articles joined by blank
lines), stride = window (no overlap, no carried context); every window predicts its tokens 2..window.
Perplexity = exp(mean NLL); agreement = share of positions where both models' argmax agree;
KL = mean over positions of KL(P_bf16 || P_quant) in float32. The quantized model runs through
``quant.reference`` (the kernels' numerics), activations in BF16 between layers like the engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.decoder import Decoder

DEFAULT_WINDOWS, DEFAULT_WINDOW = 32, 512


@dataclass(frozen=True)
class EvalConfig:
    windows: int = DEFAULT_WINDOWS
    window: int = DEFAULT_WINDOW
    batch_size: int = 2
    language: str = "en-us"  # held-out Wikipedia extracts in this language (quant.data.LANGUAGES)


@dataclass
class _Acc:
    nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    n: int = 0


def _logits(model: Decoder, tokens: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(tokens.shape[0], tokens.shape[1])
    return model(tokens, cache, 0)[:, :-1].float()


@torch.inference_mode()
def compare(reference: Decoder, candidates: dict[str, Decoder], tokens: torch.Tensor, batch_size: int = 2,
            progress: bool = True) -> dict[str, dict[str, float]]:
    """Perplexity of the reference and of each candidate, plus candidates' agreement and KL vs the reference."""
    accs = {"reference": _Acc(), **{k: _Acc() for k in candidates}}
    batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
    for batch in tqdm(batches, desc="evaluating", disable=not progress, unit="batch"):
        target = batch[:, 1:].reshape(-1)
        ref_logp = F.log_softmax(_logits(reference, batch).reshape(target.numel(), -1), -1)
        ref_top = ref_logp.argmax(-1)
        a = accs["reference"]
        a.nll += float(F.nll_loss(ref_logp, target, reduction="sum"))
        a.agree += target.numel()
        a.n += target.numel()
        ref_p = ref_logp.exp()
        for name, model in candidates.items():
            logp = F.log_softmax(_logits(model, batch).reshape(target.numel(), -1), -1)
            a = accs[name]
            a.nll += float(F.nll_loss(logp, target, reduction="sum"))
            a.agree += int((logp.argmax(-1) == ref_top).sum())
            a.kl += float((ref_p * (ref_logp - logp)).sum())
            a.n += target.numel()
            del logp
    ref_ppl = math.exp(accs["reference"].nll / accs["reference"].n)
    out = {"reference": {"perplexity": ref_ppl, "tokens": accs["reference"].n}}
    for name in candidates:
        a = accs[name]
        ppl = math.exp(a.nll / a.n)
        out[name] = {"perplexity": ppl, "delta_pct": 100 * (ppl / ref_ppl - 1), "agreement": a.agree / a.n,
                     "kl": a.kl / a.n, "tokens": a.n}
    return out


def evaluate_checkpoints(folders: dict[str, str | Path], ec: EvalConfig = EvalConfig(),
                         progress: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate checkpoints built from the same model in one pass over the windows (the BF16 model runs once)."""
    from models.chat import load_tokenizer
    from models.registry import resolve
    from models.weights import load_decoder
    from quant.checkpoint import CheckpointError, load_checkpoint
    from quant.data import eval_windows
    from quant.reference import reference_decoder

    ckpts = {name: load_checkpoint(f) for name, f in folders.items()}
    sources = {c.manifest["source"]["model"] for c in ckpts.values()}
    if len(sources) != 1:
        raise CheckpointError(f"checkpoints come from different models ({sorted(sources)}); evaluate them separately")
    source = resolve(sources.pop())
    reference = load_decoder(source, torch.bfloat16)
    tokens = eval_windows(load_tokenizer(source), ec.windows, ec.window, ec.language)
    candidates = {name: reference_decoder(c, torch.bfloat16) for name, c in ckpts.items()}
    result = compare(reference, candidates, tokens, ec.batch_size, progress)
    result["reference"].update({"model": str(source), "windows": ec.windows, "window": ec.window,
                                "stride": ec.window, "language": ec.language})
    return result
