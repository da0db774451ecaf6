"""Data split, statistics cache, checkpoint round trip and refusal of broken checkpoints, evaluation, CLI."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from models.registry import file_digest  # noqa: E402
from quant.checkpoint import MANIFEST, CheckpointError, load_checkpoint  # noqa: E402
from quant.data import DataError, calibration_samples, eval_windows, read_user_file, wiki_split  # noqa: E402
from quant.pipeline import QuantizeConfig, quantize  # noqa: E402
from tests.quant_fixtures import TINY, write_tiny_folder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    from models.chat import load_tokenizer

    return load_tokenizer(embedded_folder)


@pytest.fixture(scope="module")
def tiny(embedded_folder, tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", embedded_folder)


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """One checkpoint per interesting scheme, built from the tiny model (small calibration)."""
    out = tmp_path_factory.mktemp("ckpts")
    common = dict(model=str(tiny), samples=4, seq_len=64, search_samples=2, search_tokens=128, batch_size=2)
    specs = {
        "sq": QuantizeConfig(scheme="w8a8-int8", alpha="auto", kv_cache="int8", **common),
        "static": QuantizeConfig(scheme="w8a8-int8", alpha=0.5, activations="static", **common),
        "fp8": QuantizeConfig(scheme="w8a8-fp8", alpha=0.0, kv_cache="fp8", **common),
        "w8a16": QuantizeConfig(scheme="w8a16-int8", **common),
        "bf16": QuantizeConfig(scheme="bf16", **common),
        "keep": QuantizeConfig(scheme="w8a8-int8", alpha=0.5, keep_bf16=("model.layers.1.mlp.down_proj",), **common),
    }
    return {k: quantize(qc, out / k, progress=False) for k, qc in specs.items()}


def test_wiki_split_is_deterministic_and_disjoint():
    calib, evals = wiki_split()
    calib2, evals2 = wiki_split()
    assert calib == calib2 and evals == evals2
    assert not {a.title for a in calib} & {a.title for a in evals}
    assert len(calib) > 5000 and 1000 < len(evals) < 4000
    assert not {a.text for a in calib} & {a.text for a in evals}


def test_calibration_samples_mix_plain_and_chat(tokenizer):
    rows = calibration_samples(tokenizer, 4, 64)
    assert rows.shape == (4, 64) and rows.dtype == torch.long
    assert torch.equal(rows, calibration_samples(tokenizer, 4, 64))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (rows[1] == im_start).any() and not (rows[0] == im_start).any()  # row 1 is a chat turn
    held_out = eval_windows(tokenizer, 2, 64)
    assert held_out.shape == (2, 64)


def test_held_out_text_in_other_languages(tokenizer):
    english = tokenizer.decode(eval_windows(tokenizer, 1, 128)[0])
    for language, words in (("es-es", (" de ", " la ", " el ")), ("fr-fr", (" de ", " la ", " le "))):
        text = tokenizer.decode(eval_windows(tokenizer, 1, 128, language)[0])
        assert text != english and sum(text.count(w) for w in words) >= 3, text
        calib, evals = wiki_split(language=language)
        assert evals and calib and not {a.title for a in calib} & {a.title for a in evals}
        assert not {a.text for a in calib} & {a.text for a in evals}  # files list some articles under two keys
    with pytest.raises(DataError, match="choose one of en-us, es-es, fr-fr"):
        eval_windows(tokenizer, 1, 64, "de-de")


def test_user_calibration_files(tokenizer, tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("First paragraph about cats. " * 10 + "\n\n" + "Second about dogs. " * 10)
    jl = tmp_path / "c.jsonl"
    jl.write_text(
        json.dumps({"text": "hello world " * 30})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    )
    assert len(read_user_file(txt)) == 2 and isinstance(read_user_file(jl)[1], list)
    assert calibration_samples(tokenizer, 2, 16, txt).shape == (2, 16)
    bad = tmp_path / "c.csv"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        read_user_file(bad)
    with pytest.raises(ValueError, match="fewer than"):
        calibration_samples(tokenizer, 100, 512, jl)


def test_stats_cache_miss_then_hit(tiny, tokenizer, tmp_path, monkeypatch):
    from models.weights import load_decoder
    from quant.stats import cached_stats, stats_path

    monkeypatch.setenv("Q8CHAT_CACHE", str(tmp_path))
    model = load_decoder(tiny, torch.bfloat16)
    samples = calibration_samples(tokenizer, 2, 32)
    stats, hit = cached_stats(model, tiny, samples, progress=False)
    assert not hit and stats_path(stats.meta["key"]).is_file()
    assert stats.input_absmax("model.layers.1.mlp.down_proj").shape == (128,)
    assert stats.kv_absmax(0)[0].shape == (2, 16)
    again, hit2 = cached_stats(model, tiny, samples, progress=False)
    assert hit2 and all(torch.equal(again.tensors[k], v) for k, v in stats.tensors.items())
    _, hit3 = cached_stats(model, tiny, samples[:1], progress=False)  # other data: miss
    assert not hit3
    # statistics match a direct measurement of the first layer's q_proj input
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(samples)).float()
    assert torch.allclose(stats.input_absmax("model.layers.0.self_attn.q_proj"), h.abs().amax((0, 1)))


def test_checkpoint_round_trip(built):
    ck = load_checkpoint(built["sq"])
    assert ck.scheme.name == "w8a8-int8" and ck.alpha == "auto" and ck.config.num_layers == 2
    w, ws, xs = ck.linear("model.layers.0.self_attn.q_proj")
    assert w.dtype == torch.int8 and w.shape == (64, 64) and ws.shape == (64, 1) and ws.dtype == torch.float32
    assert xs is None
    ks, vs = ck.kv_scales()
    assert len(ks) == 2 and ks[0].shape == (1,) and float(ks[0]) > 0
    assert "model.layers.0.self_attn.k_scale" in ck.tensors
    qc = json.loads((built["sq"] / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["ignore"] == ["lm_head"]
    st = load_checkpoint(built["static"])
    assert st.linear("model.layers.1.mlp.down_proj").input_scale.shape == (1,)
    fp8 = load_checkpoint(built["fp8"])
    assert fp8.linear("model.layers.0.mlp.up_proj").weight.dtype == torch.float8_e4m3fn
    assert load_checkpoint(built["bf16"]).tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    keep = load_checkpoint(built["keep"])
    assert keep.linear("model.layers.1.mlp.down_proj").weight_scale is None
    assert keep.linear("model.layers.1.mlp.up_proj").weight.dtype == torch.int8
    qc = json.loads((built["keep"] / "config.json").read_text())["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.down_proj"]


def test_reference_decoder_follows_bf16_model(built, tiny):
    from models.weights import load_decoder
    from quant.reference import QuantLinearRef, reference_decoder

    base = load_decoder(tiny, torch.bfloat16)
    tokens = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    limits = {
        "bf16": 1e-12,
        "w8a16": 0.005,
        "sq": 0.02,
        "fp8": 0.1,
        "keep": 0.02,
    }  # relative squared error of the logits
    with torch.no_grad():
        ref = base(tokens, base.new_cache(1, 16), 0)
        for name, limit in limits.items():
            model = reference_decoder(load_checkpoint(built[name]))
            if name != "bf16":
                assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinearRef)
            if name == "keep":
                assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)
            out = model(tokens, model.new_cache(1, 16), 0)
            rel = float((out - ref).pow(2).mean() / ref.pow(2).mean())
            assert rel < limit, (name, rel)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rehash(folder: Path, name: str) -> None:
    m = json.loads((folder / MANIFEST).read_text())
    m["files"][name] = {"sha256": file_digest(folder / name), "bytes": (folder / name).stat().st_size}
    (folder / MANIFEST).write_text(json.dumps(m))


def test_broken_checkpoints_are_refused_naming_the_file(built, tmp_path):
    src = built["w8a16"]
    d = _copy(src, tmp_path / "flip")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match its sha256"):
        load_checkpoint(d)

    d = _copy(src, tmp_path / "trunc")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is \d+ bytes .* truncated"):
        load_checkpoint(d)
    _rehash(d, "model.safetensors")  # even with a forged manifest, safetensors itself refuses
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors"):
        load_checkpoint(d)

    d = _copy(src, tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json (is \d+ bytes|does not match its sha256)"):
        load_checkpoint(d)
    _rehash(d, "config.json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*mlp.* has shape"):
        load_checkpoint(d)

    d = _copy(src, tmp_path / "scheme")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    _rehash(d, "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config does not describe"):
        load_checkpoint(d)

    d = _copy(src, tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer file .*tokenizer\.json is missing"):
        load_checkpoint(d)

    d = _copy(src, tmp_path / "nomanifest")
    (d / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=r"q8chat_manifest\.json is missing"):
        load_checkpoint(d)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"q8chat_manifest\.json is not valid JSON"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_build_reuses_a_valid_checkpoint(tiny, tmp_path, monkeypatch):
    import quant

    monkeypatch.setenv("Q8CHAT_CACHE", str(tmp_path))
    a = quant.build(str(tiny), "w8a16-int8")
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    b = quant.build(str(tiny), "w8a16-int8")
    assert a == b and (b / "model.safetensors").stat().st_mtime_ns == stamp
    (a / "model.safetensors").write_bytes(b"broken")
    c = quant.build(str(tiny), "w8a16-int8")  # broken cache entry: rebuilt
    assert load_checkpoint(c).scheme.name == "w8a16-int8"
    with pytest.raises(ValueError, match="unknown scheme"):
        quant.build(str(tiny), "w4a16")


def test_compare_metrics(built, tiny):
    from models.weights import load_decoder
    from quant.evaluate import compare
    from quant.reference import reference_decoder

    base = load_decoder(tiny, torch.bfloat16)
    tokens = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(1))
    res = compare(
        base,
        {
            "bf16": reference_decoder(load_checkpoint(built["bf16"])),
            "fp8": reference_decoder(load_checkpoint(built["fp8"])),
        },
        tokens,
        progress=False,
    )
    assert res["bf16"]["kl"] == pytest.approx(0, abs=1e-9) and res["bf16"]["agreement"] == 1.0
    assert res["fp8"]["kl"] > 0 and res["reference"]["tokens"] == 62


def test_cli_help_and_errors(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "quant", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "w8a8-int8" in r.stdout and "quantize" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "quant", "eval", str(tmp_path / "missing")], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "quant",
            "quantize",
            "--scheme",
            "w8a8-int8",
            "--alpha",
            "7",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "alpha must be in [0, 1]" in r.stderr




def test_multilingual_calibration_interleaves_the_languages(tokenizer):
    english = calibration_samples(tokenizer, 4, 64)
    multi = calibration_samples(tokenizer, 6, 64, "wiki-multi")
    assert multi.shape == (6, 64)
    assert torch.equal(multi[0], english[0])  # row 0 is English in both: the prefix holds every language
    spanish, french = tokenizer.decode(multi[1]), tokenizer.decode(multi[2])
    assert " de " in spanish and spanish != tokenizer.decode(english[1]) and " de " in french
    assert not torch.equal(multi[1], multi[2])


def test_a_build_reports_its_progress_layer_by_layer(tiny, tmp_path, monkeypatch):
    from quant import progress

    seen = []
    real = progress.report
    monkeypatch.setattr(progress, "report", lambda *a: (seen.append(a), real(*a)))
    common = dict(model=str(tiny), samples=4, seq_len=64, search_samples=2, search_tokens=128, batch_size=2,
                  data=str(tmp_path / "calibration.txt"))  # fmt: skip
    fresh = f"Calibration text no statistics were cached for ({tmp_path.name}, {time.time_ns()}). "
    (tmp_path / "calibration.txt").write_text(fresh * 40)
    quantize(QuantizeConfig(scheme="w8a8-int8", alpha="auto", **common), tmp_path / "ckpt", progress=False)
    layers = TINY["num_hidden_layers"]
    stages = [s for s, _, _ in seen]
    assert [s for s in dict.fromkeys(stages)] == ["activation statistics", "alpha search", "quantizing"]
    for stage in ("activation statistics", "alpha search", "quantizing"):
        assert [(d, t) for s, d, t in seen if s == stage] == [(i, layers) for i in range(layers)]
    assert progress.current() is None  # cleared when the build ends
