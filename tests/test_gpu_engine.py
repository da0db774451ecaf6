"""GPU engine: capability gating everywhere; on CUDA, our graph-captured decoder against models.decoder."""

import pytest
import torch

import gpu_backend
from models.config import DecoderConfig

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def test_schemes_by_capability():
    assert "w8a8-fp8" in gpu_backend.schemes_for((9, 0)) and "w8a8-fp8" in gpu_backend.schemes_for((8, 9))
    assert gpu_backend.schemes_for((8, 0)) == ("bf16", "w8a16-int8", "w8a8-int8")
    assert gpu_backend.schemes_for((7, 5)) == () and gpu_backend.schemes_for(None) == ()


@pytest.mark.skipif(CUDA, reason="checks the message without CUDA")
def test_unavailable_without_cuda():
    ok, why = gpu_backend.availability()
    assert not ok and "CUDA" in why
    assert gpu_backend.supported_schemes() == ()
    from gpu_backend.engine import GPUEngine
    from models.backend import RequestError

    assert GPUEngine.availability() == (ok, why)
    with pytest.raises(RequestError, match="not available"):
        GPUEngine("smollm2-135m")


TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=False)


def tiny_reference():
    from models.decoder import Decoder

    torch.manual_seed(0)
    cfg = DecoderConfig(**TINY)
    ref = Decoder(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.08 if "norm" not in name else 0.1) + (1.0 if "norm" in name else 0.0))
    return cfg, ref.to("cuda", torch.bfloat16).eval()


@cuda_only
@pytest.mark.parametrize("scheme,kv,tol", [("bf16", "bf16", 0.03), ("w8a16-int8", "bf16", 0.03),
                                          ("w8a8-int8", "int8", 0.12), ("w8a8-fp8", "fp8", 0.2)])
def test_decoder_matches_reference(scheme, kv, tol):
    if scheme not in gpu_backend.supported_schemes():
        pytest.skip(f"{scheme} not supported here")
    from gpu_backend.weights import SCHEMES, build_decoder, quantize_weights

    cfg, ref = tiny_reference()
    state = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    w_dtype = SCHEMES[scheme][0]
    if w_dtype is not None:  # the reference runs the dequantized weights: what remains is activation/KV rounding
        state = quantize_weights(state, cfg, w_dtype)
        with torch.no_grad():
            for name in ref.linear_names():
                ref.get_submodule(name).weight.copy_(state[name + ".weight"].float() * state[name + ".weight_scale"])
    for i in range(cfg.num_layers):  # int8 KV needs scales: what a calibration would give (amax / 127)
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.full((cfg.num_kv_heads,), 12 / 127)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.full((cfg.num_kv_heads,), 8 / 127)
    dec = build_decoder(state, cfg, scheme, kv)
    dec.allocate(2, 64)
    dec.decode_graph(2)
    torch.manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (2, 20), device="cuda")
    cache = ref.new_cache(2, 64)
    with torch.no_grad():
        want = ref(prompt, cache, 0, last_only=True)[:, -1]
    got = dec.prefill(prompt)
    assert ((got - want).norm() / want.norm()).item() < tol
    # decode 8 steps by graph replay, feeding the reference's greedy tokens to both
    tok = want.argmax(-1)
    for step in range(8):
        pos = torch.full((2,), 20 + step, dtype=torch.int32, device="cuda")
        got = dec.decode(tok, pos).clone()
        with torch.no_grad():
            want = ref(tok[:, None], cache, 20 + step)[:, -1]
        err = ((got - want).norm() / want.norm()).item()
        assert err < tol, (step, err)
        tok = want.argmax(-1)


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
    ids = eng.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True)
    events = list(eng.generate(list(ids), SamplingParams(max_new_tokens=16)))
    assert events[-1].finished and events[-1].timings.generated_tokens > 0
    assert "Paris" in "".join(e.text for e in events)
