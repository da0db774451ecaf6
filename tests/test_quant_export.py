"""quant.export: the smoothed float folder other runtimes quantize from is the same model, smoothed."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from models.weights import load_decoder, read_tensors  # noqa: E402
from quant.evaluate import _logits  # noqa: E402
from quant.export import CALIBRATION_FILE, EXPORT_MANIFEST, export_smoothed, read_export_manifest  # noqa: E402
from tests.quant_fixtures import write_tiny_folder  # noqa: E402

torch.set_num_threads(1)
SMALL = dict(samples=4, seq_len=64, search_samples=2, search_tokens=128, batch_size=2)


@pytest.fixture(scope="module")
def tiny(embedded_folder, tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "model", embedded_folder)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_export_is_the_same_model_with_smoothing_folded(tiny, tmp_path, alpha):
    out = export_smoothed(str(tiny), alpha=alpha, out=tmp_path / "exp", **SMALL)
    manifest = read_export_manifest(out)
    assert manifest["alpha"] == alpha and len(manifest["alphas"]) > 0
    ids = load_file(str(out / CALIBRATION_FILE))["input_ids"]
    assert ids.shape == (4, 64) and ids.dtype == torch.int64

    src, smoothed = read_tensors(tiny), read_tensors(out)
    name = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(src[name].float(), smoothed[name].float())  # the norm absorbed 1/s ...

    tokens = ids[:2, :32]
    with torch.no_grad():
        ref, got = (_logits(load_decoder(f, torch.float32), tokens) for f in (tiny, out))
    ref, got = ref.float(), got.float()
    # ... and the model is unchanged up to the BF16 rounding of the folded weights
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.02, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_export_is_reused_and_rebuilt_when_broken(tiny, tmp_path):
    out = export_smoothed(str(tiny), alpha=0.5, out=tmp_path / "exp", **SMALL)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert export_smoothed(str(tiny), alpha=0.5, out=out, **SMALL) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    (out / EXPORT_MANIFEST).write_text("{not json")
    export_smoothed(str(tiny), alpha=0.5, out=out, **SMALL)
    assert read_export_manifest(out)["alpha"] == 0.5
