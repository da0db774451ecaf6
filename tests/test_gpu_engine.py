"""GPU engine: capability gating everywhere; checkpoint mapping (keep_bf16, fusion) on the CPU; on CUDA, the
graph-captured decoder against ``quant.reference.reference_decoder`` on the same ``quant.build`` checkpoint.

The oracle is the quantizer's reference numerics (per-token int8 round-half-even / fp8 e4m3 activations,
per-channel weights, fake-quantized KV cache), not the float model: the kernels must compute what the
scheme defines, and the scheme's own error (reference vs float) is reported beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import gpu_backend
from models.config import DecoderConfig

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
RECORD = os.environ.get("GPU_TEST_RECORD")  # a JSON-lines file: measured errors (device runs)

# hidden 256 / head_dim 64: the smallest shapes on which every GEMM tile family compiles
TINY_HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
    "dtype": "bfloat16",
}
KEEP = ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj")
# (id, scheme, build options): dynamic and static INT8 (SmoothQuant, auto alpha), FP8, weight-only, BF16
CASES = [
    ("bf16", "bf16", {}),
    ("w8a16-int8", "w8a16-int8", {}),
    ("w8a8-int8-kvint8", "w8a8-int8", {"kv_cache": "int8"}),
    ("w8a8-int8-static", "w8a8-int8", {"activations": "static"}),
    ("w8a8-int8-keep", "w8a8-int8", {"keep_bf16": KEEP, "kv_cache": "fp8"}),
    ("w8a8-fp8-kvfp8", "w8a8-fp8", {"kv_cache": "fp8"}),
]


def write_tiny_model(folder: Path) -> Path:
    """A tiny random Llama folder, with outlier channels in the norms (what SmoothQuant is for)."""
    from models.decoder import Decoder

    cfg = DecoderConfig.from_hf_dict(TINY_HF)
    torch.manual_seed(0)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
                p[:: p.numel() // 4] *= 8.0
            else:
                p.normal_(0, 0.06)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(TINY_HF, indent=2))
    (folder / "tokenizer.json").write_text("{}")  # checkpoints must carry a tokenizer file; none is used here
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """quant.build checkpoints of the tiny model, calibrated on random tokens (no tokenizer, no text)."""
    import models.chat
    import quant.pipeline
    from quant import build

    root = tmp_path_factory.mktemp("gpu_ckpt")
    src = write_tiny_model(root / "tiny")
    mp = pytest.MonkeyPatch()
    mp.setenv("Q8CHAT_CACHE", str(root / "cache"))
    gen = torch.Generator().manual_seed(7)
    mp.setattr(
        quant.pipeline,
        "calibration_samples",
        lambda tok, n, seq_len, data: torch.randint(3, TINY_HF["vocab_size"], (n, seq_len), generator=gen),
    )
    mp.setattr(models.chat, "load_tokenizer", lambda folder: None)
    try:
        out = {
            cid: build(
                str(src), scheme, out=root / cid, samples=8, seq_len=64, search_samples=4, search_tokens=256, **opts
            )
            for cid, scheme, opts in CASES
        }
    finally:
        mp.undo()
    return src, out


def test_schemes_by_capability():
    assert "w8a8-fp8" in gpu_backend.schemes_for((9, 0)) and "w8a8-fp8" in gpu_backend.schemes_for((8, 9))
    assert gpu_backend.schemes_for((8, 0)) == ("bf16", "w8a16-int8", "w8a8-int8")
    assert gpu_backend.schemes_for((7, 5)) == () and gpu_backend.schemes_for(None) == ()


@pytest.mark.parametrize("capability, name", [((8, 0), "NVIDIA A100"), ((9, 0), "NVIDIA H100")])
def test_page_api_and_start_up_offer_only_what_the_gpu_runs(monkeypatch, capability, name):
    """An A100 (sm80) has no FP8 tensor cores: nothing anywhere offers or builds an FP8 scheme there."""
    import torch

    from quant.schemes import REGISTRY
    from serving.openai_api import model_ids
    from serving.service import ChatService, backend_schemes
    from serving.startup import startup_steps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    offered = backend_schemes("gpu")
    fp8 = {s for s, scheme in REGISTRY.items() if scheme.needs_fp8}
    assert offered and set(offered) <= set(REGISTRY)
    assert bool(fp8 & set(offered)) == (capability >= (8, 9))
    assert {"bf16", "w8a16-int8", "w8a8-int8"} <= set(offered)
    assert {s for _, _, backend, s in model_ids() if backend == "gpu"} == set(offered)
    planned = {step.blocks[1] for step in startup_steps(ChatService()) if step.blocks and step.blocks[0] == "gpu"}
    assert planned and planned <= set(offered)
    assert ("w8a8-fp8" in planned) == (capability >= (8, 9))  # the start-up builds and serves FP8 only on sm89+


@pytest.mark.skipif(CUDA, reason="checks the message without CUDA")
def test_unavailable_without_cuda():
    ok, why = gpu_backend.availability()
    assert not ok and "CUDA" in why
    assert gpu_backend.supported_schemes() == ()
    from gpu_backend.engine import GPUEngine
    from models.backend import RequestError

    assert GPUEngine.availability() == (ok, why)
    assert GPUEngine.supported_schemes() == ()
    with pytest.raises(RequestError, match="not available"):
        GPUEngine("smollm2-135m")


def test_checkpoint_mapping_keep_bf16(tiny_checkpoints):
    """keep_bf16 linears run as BF16 GEMMs; q|k|v and gate|up fuse only where one GEMM is exact."""
    from gpu_backend.model import Linear, UnfusedLinears
    from gpu_backend.weights import build_from_checkpoint
    from quant.checkpoint import load_checkpoint

    _, folders = tiny_checkpoints
    ckpt = load_checkpoint(folders["w8a8-int8-keep"])
    assert set(ckpt.kept_bf16) == set(KEEP)
    dec = build_from_checkpoint(ckpt, device="cpu")
    l0, l1 = dec.layers
    assert isinstance(l0.qkv, UnfusedLinears) and [p.scale is None for p in l0.qkv.parts] == [False, True, False]
    assert isinstance(l1.qkv, Linear) and l1.qkv.weight.dtype == torch.int8
    assert l1.o.scale is None and l1.down.scale is None and l1.o.act_dtype is None and l1.down.act_dtype is None
    assert isinstance(l0.gate_up, Linear) and l0.down.weight.dtype == torch.int8
    assert dec.kv_dtype == torch.float8_e4m3fn  # the checkpoint's KV scheme
    # static activations: q|k|v share one input, so one input_scale, and fuse
    st = build_from_checkpoint(load_checkpoint(folders["w8a8-int8-static"]), device="cpu")
    for lyr in st.layers:
        assert isinstance(lyr.qkv, Linear) and lyr.qkv.input_scale is not None
        assert isinstance(lyr.gate_up, Linear) and lyr.down.input_scale is not None


def test_fuse_refuses_different_static_scales():
    from gpu_backend.model import Linear, UnfusedLinears

    w = torch.zeros(4, 8, dtype=torch.int8)
    parts = [Linear(w, torch.ones(4), torch.tensor([s]), None, torch.int8) for s in (0.1, 0.1, 0.2)]
    assert isinstance(Linear.fuse(parts), UnfusedLinears) and isinstance(Linear.fuse(parts[:2]), Linear)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


@cuda_only
@pytest.mark.parametrize("bsz", [1, 2])  # batch 1: the GEMV decode path at M = 1; 2: M > 1
@pytest.mark.parametrize("cid,scheme,opts", CASES, ids=[c[0] for c in CASES])
def test_decoder_matches_reference_numerics(tiny_checkpoints, cid, scheme, opts, bsz):
    """GPU logits (prefill, then 8 graph-replayed decode steps) vs reference_decoder on the same checkpoint."""
    if scheme not in gpu_backend.supported_schemes():
        pytest.skip(f"{scheme} not supported here")
    from gpu_backend.weights import build_from_checkpoint
    from models.weights import load_decoder
    from quant.checkpoint import load_checkpoint
    from quant.reference import reference_decoder

    src, folders = tiny_checkpoints
    ckpt = load_checkpoint(folders[cid])
    models = {
        "ref": reference_decoder(ckpt, torch.bfloat16, "cpu"),  # the CPU reference numerics: the oracle
        # control: the same reference on CUDA. Its distance to the CPU run is this tiny random model's
        # sensitivity to bf16-level differences (GEMM/attention accumulation order), which per-token
        # quantization amplifies (a tiny input change flips a rounding: a whole quantization step)
        "ref_cuda": reference_decoder(ckpt, torch.bfloat16, "cuda"),
        "flt": load_decoder(src, torch.bfloat16).eval(),  # the unquantized model: the scheme's own error
    }
    dec = build_from_checkpoint(ckpt)
    t, steps = 20, 8
    dec.allocate(bsz, 64)
    dec.decode_graph(bsz)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, TINY_HF["vocab_size"], (bsz, t), generator=gen)
    dev = {"ref": "cpu", "ref_cuda": "cuda", "flt": "cpu"}
    caches = {k: m.new_cache(bsz, 64) for k, m in models.items()}
    if hasattr(caches["ref_cuda"], "k_scales"):  # reference_decoder keeps the KV scales on the CPU
        c = caches["ref_cuda"]
        c.k_scales, c.v_scales = [x.cuda() for x in c.k_scales], [x.cuda() for x in c.v_scales]
    errs: dict[str, list[float]] = {"gpu": [], "ref_cuda": [], "flt": []}
    agree = 0
    with torch.inference_mode():
        tok = None
        for step in range(steps + 1):
            if step == 0:
                outs = {k: m(prompt.to(dev[k]), caches[k], 0, last_only=True)[:, -1].cpu() for k, m in models.items()}
                got = dec.prefill(prompt.cuda()).cpu()
            else:
                p = t + step - 1
                outs = {k: m(tok[:, None].to(dev[k]), caches[k], p)[:, -1].cpu() for k, m in models.items()}
                got = dec.decode(tok.cuda(), torch.full((bsz,), p, dtype=torch.int32, device="cuda")).cpu()
            want = outs["ref"]
            errs["gpu"].append(rel(got, want))
            errs["ref_cuda"].append(rel(outs["ref_cuda"], want))
            errs["flt"].append(rel(want, outs["flt"]))
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            tok = want.argmax(-1)  # every model follows the reference's greedy tokens
    worst = {k: max(v) for k, v in errs.items()}
    if RECORD:
        with open(RECORD, "a") as f:
            rec = {
                "case": cid,
                "batch": bsz,
                "gpu_vs_reference_max": worst["gpu"],
                "reference_cuda_vs_cpu_max": worst["ref_cuda"],
                "reference_vs_float_max": worst["flt"],
                "argmax_agree": agree,
                "of": bsz * (steps + 1),
                "gpu_vs_reference": errs["gpu"],
                "reference_cuda_vs_cpu": errs["ref_cuda"],
            }
            f.write(json.dumps(rec) + "\n")
    # the engine may differ from the CPU reference by a bounded multiple of what the reference itself differs
    # between CPU and CUDA: measured on H200 (run 6), BF16 and W8A16 2.3-2.5x (the engine's rounding points in
    # attention and split-K differ from PyTorch's more than cuBLAS does), static INT8 3.1x. Bit-level
    # numerics (rounding mode, eps, scales) are checked exactly in test_gpu_kernels.py.
    assert worst["gpu"] < 4.0 * worst["ref_cuda"] + 0.01, worst
    # greedy argmax: random tiny models have near-tied logits; run 7 measured 15-18 of 18 (static int8, fp8: 15)
    assert agree >= bsz * (steps + 1) * 3 // 4, agree


@cuda_only
@pytest.mark.parametrize("cid", ["bf16", "w8a8-int8-kvint8", "w8a8-fp8-kvfp8"])
def test_prefill_graph_matches_eager(tiny_checkpoints, cid):
    """A batch-1 prefill replays the graph of its length bucket (the prompt padded at the end): its logits are
    the eager prefill's, for prompts of different lengths in one bucket and in the next; decode goes on from it."""
    from gpu_backend.model import PREFILL_BUCKETS
    from gpu_backend.weights import build_from_checkpoint
    from quant.checkpoint import load_checkpoint

    _, folders = tiny_checkpoints
    dec = build_from_checkpoint(load_checkpoint(folders[cid]))
    dec.allocate(1, 128)
    gen = torch.Generator().manual_seed(3)
    for t in (17, 30, 33):  # buckets 32, 32, 64
        prompt = torch.randint(3, TINY_HF["vocab_size"], (1, t), generator=gen).cuda()
        eager = dec.prefill(prompt, all_logits=True)[:, -1].clone()
        graphed = dec.prefill(prompt)
        assert rel(graphed, eager) < 1e-2 and graphed.argmax() == eager.argmax(), t
        nxt = dec.decode(eager.argmax(-1), torch.tensor([t], dtype=torch.int32, device="cuda")).clone()
        dec.prefill(prompt, all_logits=True)
        assert rel(nxt, dec.decode(eager.argmax(-1), torch.tensor([t], dtype=torch.int32, device="cuda"))) < 1e-2
    assert sorted(dec.prefill_graphs) == [b for b in PREFILL_BUCKETS if b in (32, 64)]


@cuda_only
def test_engine_generates_embedded_model():
    """The app's path end to end (needs the embedded model and its tokenizer installed)."""
    pytest.importorskip("tokenizers")
    from gpu_backend.engine import GPUEngine
    from models.backend import SamplingParams

    try:
        eng = GPUEngine("smollm2-135m", "bf16")
    except Exception as e:  # the model package is not on every GPU machine
        pytest.skip(f"embedded model unavailable: {e}")
    ids = eng.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    events = list(eng.generate_ids(list(ids), SamplingParams(max_new_tokens=16)))
    assert events[-1].finished and events[-1].timings.generated_tokens > 0
    # no "Paris" assertion: the first answer token is a near-tie in this model (see
    # bench/results/gpu_embedded.md), so greedy text flips between "The capital ..." and "L'Étoile ..."
    assert "".join(e.text for e in events).strip()
