"""Out of memory while loading a model: refused before any weight is read, with the numbers, and the model
that was serving keeps serving. The estimate comes from the safetensors headers."""

import math
import re

import pytest
from safetensors import safe_open

import cpu_backend.engine
from models.backend import RequestError, SamplingParams
from models.registry import DEFAULT_MODEL
from models.weights import CheckpointError, parameter_count
from serving import service as service_module
from serving.service import GIB, ChatService, ChatSettings
from tests.quant_fixtures import write_tiny_folder

QUESTION = "What is the capital of France? Answer in one short sentence."


def answer(service: ChatService, model: str = DEFAULT_MODEL) -> str:
    settings = ChatSettings("cpu", model, "bf16", "", SamplingParams(max_new_tokens=12))
    return [u.text for u in service.chat(QUESTION, [], settings)][-1]


def test_estimate_is_the_weight_count_from_the_headers_times_the_schemes_bytes(embedded_folder):
    with safe_open(str(embedded_folder / "model.safetensors"), framework="pt") as f:
        weights = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert weights > 100_000_000  # SmolLM2-135M
    assert parameter_count(embedded_folder) == weights
    load_bytes = cpu_backend.engine.CPUEngine.load_bytes
    assert load_bytes(DEFAULT_MODEL, "bf16") == 4 * weights  # two copies of BF16 weights at most
    assert load_bytes(DEFAULT_MODEL, "w8a8-int8") == 2 * weights  # the GEMV's layout and oneDNN's
    assert load_bytes(DEFAULT_MODEL, "w8a16-int8") == weights
    with pytest.raises(RequestError, match="not available on CPU"):
        load_bytes(DEFAULT_MODEL, "w8a8-fp8")
    available = service_module.available_memory_bytes()
    assert available is not None and available > 0


def test_a_broken_header_is_refused_naming_the_file(tmp_path, embedded_folder):
    folder = write_tiny_folder(tmp_path / "tiny", embedded_folder)
    weights = folder / "model.safetensors"
    weights.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # claims a header larger than the file
    with pytest.raises(CheckpointError, match=re.escape(str(weights))):
        parameter_count(folder)


@pytest.fixture
def service_with_a_model(embedded_folder):
    """A fresh ChatService that serves the embedded model (model A) on CPU."""
    service = ChatService()
    engine = service.engine("cpu", DEFAULT_MODEL, "bf16")
    return service, engine, answer(service)


@pytest.fixture
def constructed(monkeypatch):
    """Every CPU engine construction attempted from now on (model spec)."""
    seen = []
    real = cpu_backend.engine.CPUEngine.__init__

    def spy(self, model, *args, **kwargs):
        seen.append(model)
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(cpu_backend.engine.CPUEngine, "__init__", spy)
    return seen


def test_a_model_too_big_for_the_memory_is_refused_and_the_previous_one_keeps_serving(
    service_with_a_model, constructed, embedded_folder, tmp_path, monkeypatch
):
    service, engine_a, before = service_with_a_model
    big = str(write_tiny_folder(tmp_path / "big-model", embedded_folder))  # model B
    need = cpu_backend.engine.CPUEngine.load_bytes(big, "bf16")
    free = need // 3
    monkeypatch.setattr(service_module, "available_memory_bytes", lambda: free)

    with pytest.raises(RequestError) as refused:
        service.engine("cpu", big, "bf16")
    message = str(refused.value)
    assert "not enough memory" in message and repr(big) in message and "previous model keeps serving" in message
    assert f"needs about {need / GIB:.2f} GiB and {free / GIB:.2f} GiB are available" in message
    assert constructed == []  # refused before loading anything

    # the same refusal through a chat, then model A still answers, unchanged
    with pytest.raises(RequestError, match="not enough memory"):
        answer(service, big)
    assert service.engine("cpu", DEFAULT_MODEL, "bf16") is engine_a
    assert answer(service) == before and "Paris" in before

    # with the memory there, model B loads (the check refuses only what does not fit)
    monkeypatch.setattr(service_module, "available_memory_bytes", lambda: need + 1)
    assert service.engine("cpu", big, "bf16") is not engine_a and constructed == [big]


def test_memory_error_during_the_load_is_a_message_and_the_previous_model_keeps_serving(
    service_with_a_model, embedded_folder, tmp_path, monkeypatch
):
    service, engine_a, before = service_with_a_model
    big = str(write_tiny_folder(tmp_path / "big-model", embedded_folder))

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(cpu_backend.engine, "load_decoder", out_of_memory)  # the estimate passed, the load did not
    with pytest.raises(RequestError, match=r"not enough memory to load .*previous model keeps serving"):
        service.engine("cpu", big, "bf16")
    assert service.engine("cpu", DEFAULT_MODEL, "bf16") is engine_a
    assert answer(service) == before
