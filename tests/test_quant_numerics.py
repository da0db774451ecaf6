"""Reference kernel numerics, weight quantization and SmoothQuant's exactness."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from models.config import DecoderConfig  # noqa: E402
from models.decoder import Decoder  # noqa: E402
from quant.reference import (  # noqa: E402
    QuantLinearRef,
    dequantize_weight,
    fake_quant_kv,
    quantize_per_token_fp8,
    quantize_per_token_int8,
    quantize_weight,
)
from quant.schemes import SCHEMES, SchemeError, get_scheme, quantization_config  # noqa: E402
from quant.smooth import MAPPINGS, search_layer, smooth_layer, smoothing_scales  # noqa: E402
from quant.stats import Stats  # noqa: E402
from tests.quant_fixtures import TINY, tiny_decoder  # noqa: E402

torch.set_num_threads(1)


def test_scheme_names_are_the_contract():
    # the names checkpoints, the page and the API carry; a rename breaks every cached checkpoint and client
    assert SCHEMES == ("bf16", "w8a16-int8", "w8a16-fp8", "w8a8-int8", "w8a8-fp8")
    with pytest.raises(SchemeError, match="unknown scheme"):
        get_scheme("int4")
    with pytest.raises(SchemeError, match="static"):
        get_scheme("w8a8-fp8", activations="static")


def test_int8_weight_round_trip_error_is_bounded_per_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g) * torch.logspace(-3, 1, 96)[:, None]  # rows of very different scale
    q, s = quantize_weight(w, "int")
    assert q.dtype == torch.int8 and s.shape == (96, 1) and s.dtype == torch.float32
    assert int(q.abs().max()) <= 127
    err = (dequantize_weight(q, s) - w).abs()
    assert torch.all(err <= s / 2 + 1e-7 * w.abs().amax(1, keepdim=True))  # half a step per channel
    assert torch.all(q.abs().amax(1) == 127)  # each row uses the full range


def test_fp8_weight_round_trip_relative_error():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(1))
    q, s = quantize_weight(w, "float")
    assert q.dtype == torch.float8_e4m3fn
    rel = ((dequantize_weight(q, s) - w).abs() / w.abs().clamp_min(1e-2 * w.abs().max()))
    assert float(rel.max()) <= 2**-4 + 1e-6  # E4M3: 3 mantissa bits, half-ulp rounding


def test_per_token_int8_rounds_half_to_even_and_clamps():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 63.5]])
    q, s = quantize_per_token_int8(x)
    assert float(s) == pytest.approx(1.0)
    assert q.tolist() == [[127, 0, 2, -2, 64]]
    fq, fs = quantize_per_token_fp8(torch.tensor([[448.0, -1.0, 0.0]]))
    assert fq.float().tolist() == [[448.0, -1.0, 0.0]] and float(fs) == 1.0


def test_quant_linear_ref_matches_explicit_math():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 40, generator=g).to(torch.bfloat16)
    w = torch.randn(24, 40, generator=g)
    q, s = quantize_weight(w, "int")
    y = QuantLinearRef(q, s, "int")(x)
    xf = x.float().reshape(-1, 40)
    xs = xf.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xf / xs).clamp(-127, 127)
    expect = ((xq.double() @ q.double().t()) * xs.double() * s.double().t()).float().to(torch.bfloat16)
    assert y.shape == (3, 5, 24) and y.dtype == torch.bfloat16
    assert torch.equal(y.reshape(-1, 24), expect)
    # static per-tensor scale and weight-only
    exact = x.float() @ w.t()

    def rel(y):
        return float((y.float() - exact).abs().max() / exact.abs().max())

    assert rel(QuantLinearRef(q, s, "int", torch.tensor([xf.abs().max() / 127]))(x)) < 0.03
    assert rel(QuantLinearRef(q, s, None)(x)) < 0.02
    qf, sf = quantize_weight(w, "float")
    assert rel(QuantLinearRef(qf, sf, "float")(x)) < 0.06
    with pytest.raises(ValueError):
        QuantLinearRef(qf, sf, "int")


def test_fake_quant_kv():
    k = torch.randn(2, 3, 4, 8)
    scale = k.abs().max() / 127
    out = fake_quant_kv(k, scale, "int8")
    assert (out - k).abs().max() <= scale / 2 + 1e-6
    out8 = fake_quant_kv(k, k.abs().max() / 448, "fp8")
    assert ((out8 - k).abs() / k.abs().clamp_min(0.05)).max() < 0.07


def _fake_stats(cfg: DecoderConfig, seed: int = 0) -> Stats:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(cfg.num_layers):
        for m in MAPPINGS:
            dim = cfg.num_heads * cfg.head_dim if m.key == "o" else (
                cfg.intermediate_size if m.key == "down" else cfg.hidden_size)
            amax = torch.rand(dim, generator=g) + 0.1
            amax[::7] *= 50
            for n in m.linears:
                t[f"model.layers.{i}.{n}.input_absmax"] = amax
    return Stats(t)


def _smoothed_copy(model: Decoder, stats: Stats, alpha: float) -> Decoder:
    cfg = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        layer = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        smooth_layer(cfg, i, layer, stats, {m.key: alpha for m in MAPPINGS})
        state.update({p + k: v for k, v in layer.items()})
    other = Decoder(cfg)
    other.load_state_dict(state)
    return other.eval()


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_smoothing_leaves_float_outputs_unchanged(qkv_bias):
    hf = dict(TINY, model_type="qwen2" if qkv_bias else "llama")
    model = tiny_decoder(hf)
    if qkv_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.v_proj.bias.normal_(0, 0.1)
    smoothed = _smoothed_copy(model, _fake_stats(model.config), 0.5)
    # the smoothing really moved weights around
    norm = model.model.layers[0].input_layernorm.weight
    assert not torch.allclose(smoothed.model.layers[0].input_layernorm.weight, norm)
    assert not torch.allclose(smoothed.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    tokens = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(tokens, model.new_cache(2, 24), 0)
        b = smoothed(tokens, smoothed.new_cache(2, 24), 0)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())


def test_smoothing_scale_formula():
    x = torch.tensor([4.0, 1.0, 100.0])
    w = torch.tensor([[1.0, 0.5, 0.25], [-2.0, 0.1, 0.1]])
    s = smoothing_scales(x, [w], 0.5)
    assert torch.allclose(s, torch.sqrt(x) / torch.sqrt(torch.tensor([2.0, 0.5, 0.25])))


def test_auto_alpha_beats_no_smoothing_on_outlier_activations():
    model = tiny_decoder()
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, cfg.hidden_size, generator=g)
    x[:, ::9] *= 60  # channel outliers
    stats = _fake_stats(cfg)
    stats.tensors.update({f"model.layers.0.self_attn.{n}.input_absmax": x.abs().amax(0) for n in ("q_proj", "k_proj",
                                                                                                     "v_proj")})
    layer = {k[len("model.layers.0."):]: v.float() for k, v in model.state_dict().items()
             if k.startswith("model.layers.0.")}
    inputs = {"self_attn.q_proj": x, "self_attn.o_proj": torch.randn(256, 64, generator=g),
              "mlp.gate_proj": torch.randn(256, 64, generator=g), "mlp.down_proj": torch.randn(256, 128, generator=g)}
    alphas, errors = search_layer(cfg, 0, layer, stats, inputs)
    assert set(alphas) == {"qkv", "o", "gate_up", "down"}
    assert alphas["qkv"] > 0 and min(errors["qkv"]) < 0.5 * errors["qkv"][0]


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("kv", ["none", "int8", "fp8"])
def test_compressed_tensors_parses_our_quantization_config(name, kv):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    qc = quantization_config(get_scheme(name, kv), ["lm_head"])
    if qc is None:
        assert name == "bf16" and kv == "none"
        return
    parsed = QuantizationConfig.model_validate(qc)
    if name != "bf16":
        group = parsed.config_groups["group_0"]
        assert group.weights.num_bits == 8 and group.weights.strategy == QuantizationStrategy.CHANNEL
        if get_scheme(name).activation_type is None:
            assert group.input_activations is None
        else:
            assert group.input_activations.dynamic is True
            assert group.input_activations.strategy == QuantizationStrategy.TOKEN
    if kv != "none":
        assert parsed.kv_cache_scheme.strategy == QuantizationStrategy.TENSOR
    static = QuantizationConfig.model_validate(quantization_config(get_scheme("w8a8-int8", activations="static"), []))
    assert static.config_groups["group_0"].input_activations.dynamic is False
