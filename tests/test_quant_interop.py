"""Interoperability: transformers (through the real compressed-tensors package) loads our checkpoint."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def sq_checkpoint(embedded_folder, tmp_path_factory):
    from quant.pipeline import QuantizeConfig, quantize

    qc = QuantizeConfig(scheme="w8a8-int8", alpha=0.5, samples=4, seq_len=128, batch_size=4)
    return quantize(qc, tmp_path_factory.mktemp("interop") / "sq", progress=False)


@pytest.mark.slow
def test_transformers_loads_our_w8a8_checkpoint_and_generates(sq_checkpoint):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quant.checkpoint import load_checkpoint
    from quant.reference import reference_decoder

    model = AutoModelForCausalLM.from_pretrained(str(sq_checkpoint))  # no trust_remote_code
    assert model.config.quantization_config is not None
    parsed = QuantizationConfig.model_validate(model.config.quantization_config.quantization_config.model_dump())
    assert parsed.config_groups["group_0"].weights.num_bits == 8
    tok = AutoTokenizer.from_pretrained(str(sq_checkpoint))
    question = "What is the capital of France? Answer in one short sentence."
    ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in text, text
        # transformers' fake-quant forward and our reference mostly agree on the next tokens; not exactly:
        # compressed-tensors' int8 activation scale is amax/127.5 with clamp [-128, 127], ours amax/127 and
        # [-127, 127] (what the int8 kernels do), and its float math differs.
        hf_logits = model(out).logits[0].float()
        ours = reference_decoder(load_checkpoint(sq_checkpoint))
        our_logits = ours(out, ours.new_cache(1, out.shape[1]), 0)[0]
    agree = (hf_logits.argmax(-1) == our_logits.argmax(-1)).float().mean()
    assert agree > 0.75, float(agree)


@pytest.mark.parametrize("scheme", ["w8a8-int8", "w8a8-fp8"])
def test_compressed_tensors_decompresses_exactly_what_we_wrote(scheme, embedded_folder, tmp_path, monkeypatch):
    """compressed-tensors (what vLLM and transformers run our checkpoints through) turns every quantized linear
    back into q * weight_scale, bit for bit, from our config and tensors."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from models.registry import MODEL_DIRS_ENV
    from models.weights import read_tensors
    from quant.checkpoint import load_checkpoint
    from quant.pipeline import QuantizeConfig, quantize
    from tests.quant_fixtures import write_tiny_folder

    monkeypatch.setenv(MODEL_DIRS_ENV, str(tmp_path))
    tiny = write_tiny_folder(tmp_path / "tiny", embedded_folder)
    qc = QuantizeConfig(model=str(tiny), scheme=scheme, alpha=0.5, samples=2, seq_len=32, batch_size=2)
    ckpt = load_checkpoint(quantize(qc, tmp_path / scheme, progress=False))
    model = AutoModelForCausalLM.from_pretrained(str(ckpt.folder), quantization_config=CompressedTensorsConfig(
        dequantize=True))
    source = read_tensors(tiny)
    names = ckpt.linear_names()
    assert names
    for name in names:
        q, scale, _ = ckpt.linear(name)
        assert q.dtype == (torch.int8 if scheme == "w8a8-int8" else torch.float8_e4m3fn)
        dense = model.get_submodule(name).weight
        assert torch.equal(dense, (q.float() * scale.float()).to(dense.dtype)), name
    changed = sum(not torch.equal(model.get_submodule(n).weight, source[n + ".weight"]) for n in names)
    assert changed > len(names) // 2  # the quantized values, not the BF16 source that was smoothed and rounded
