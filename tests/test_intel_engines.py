"""The Intel engines (OpenVINO, IPEX) in their own venvs: they chat, stay close to BF16, cancel, recover, explain.

`make test` builds both venvs first (cached by requirements hash) and sets Q8CHAT_REQUIRE_INTEL=1, so a
missing venv fails there instead of skipping; a bare `pytest` without them skips these tests with the reason.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from models.backend import RequestError, SamplingParams
from models.chat import build_prompt
from models.registry import DEFAULT_MODEL
from serving.service import ChatService, ChatSettings, backend_availability, backend_class, default_backend

pytestmark = pytest.mark.slow  # builds and runs the OpenVINO and IPEX workers

GREEDY = SamplingParams(max_new_tokens=24)
QUESTION = "What is the capital of France? Answer in one short sentence."
RUNTIMES = ("openvino", "ipex")
# vs our BF16 model on 4 held-out windows: top-1 agreement and perplexity ratio. Failures these caught: an INT8
# LM head (both runtimes quantize it unless told not to), RoPE theta lost between transformers 5 and 4.x configs.
MIN_AGREEMENT = 0.78
MAX_PPL_RATIO = {"bf16": 1.05, "w8a16-int8": 1.05, "w8a8-int8": 1.12}


def require(runtime: str) -> None:
    ok, reason = backend_availability(runtime)
    if not ok:
        if os.environ.get("Q8CHAT_REQUIRE_INTEL"):
            pytest.fail(f"{runtime}: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def windows(embedded_folder):
    from models.chat import load_tokenizer
    from quant.data import eval_windows

    return eval_windows(load_tokenizer(embedded_folder), 4, 256)


@pytest.fixture(scope="module")
def reference(embedded_folder, windows):
    """Our BF16 model's argmax and perplexity on the held-out windows (the reference of bench/quality.py)."""
    from models.weights import load_decoder

    model = load_decoder(embedded_folder, torch.bfloat16)
    with torch.inference_mode():
        logits = model(windows, model.new_cache(*windows.shape), 0)[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return logits.argmax(-1), float(torch.exp(nll))


def ask(engine, question: str = QUESTION, params: SamplingParams = GREEDY, cancel=None):
    prompt = build_prompt(engine.tokenizer, question, [], "", max_tokens=engine.context_length - 64)
    events = list(engine.generate_ids(prompt.ids, params, cancel))
    return "".join(e.text for e in events), events[-1]


@pytest.mark.parametrize("scheme", ["bf16", "w8a16-int8", "w8a8-int8"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_engine_answers_and_stays_close_to_bf16(runtime, scheme, windows, reference):
    require(runtime)
    # W8A8 calibrates on 8 of the shared samples here (the product uses 32; CI time): its own cache entry
    engine = backend_class(runtime)(DEFAULT_MODEL, scheme, calibration_samples=8)
    try:
        assert engine.scheme == scheme and engine.info["threads"] >= 1
        nll, top1 = engine.score(windows.tolist())
        reference_top1, reference_ppl = reference
        top1 = torch.tensor(top1)
        assert top1.shape == reference_top1.shape
        ppl = float(torch.exp(torch.tensor(sum(nll) / windows[:, 1:].numel())))
        agreement = float((top1 == reference_top1).float().mean())
        print(f"{runtime} {scheme}: perplexity {ppl:.3f} (ours BF16 {reference_ppl:.3f}), agreement {agreement:.4f}")
        assert ppl <= reference_ppl * MAX_PPL_RATIO[scheme], (ppl, reference_ppl)
        assert agreement >= MIN_AGREEMENT, agreement

        text, last = ask(engine)
        assert last.finished and last.finish_reason in ("eos", "length")
        t = last.timings
        assert t.generated_tokens >= 2 and t.ttft_ms > 0 and t.tpot_ms > 0 and t.prompt_tokens > 10
        if scheme != "w8a8-int8":  # IPEX static INT8 answers this one in French (perplexity +5%, bounded above)
            assert "Paris" in text, text
    finally:
        engine.close()


def test_sampling_ignore_eos_cancel_and_recovery():
    require("openvino")
    engine = backend_class("openvino")(DEFAULT_MODEL, "w8a16-int8")
    try:
        sampled = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
        a, last = ask(engine, params=sampled)
        b, _ = ask(engine, params=sampled)
        assert a == b and last.timings.generated_tokens == 12 and last.finish_reason == "length"

        cancel = threading.Event()
        prompt = build_prompt(engine.tokenizer, "Write a long story about a dragon.", [], "", max_tokens=512)
        stream = engine.generate_ids(prompt.ids, SamplingParams(max_new_tokens=400, ignore_eos=True), cancel)
        events = []
        for event in stream:  # consumed to the end, like the app does: the engine's lock is released there
            events.append(event)
            if len(events) == 3:
                cancel.set()
        assert events[-1].finished and events[-1].finish_reason == "cancelled" and len(events) < 50
        text, _ = ask(engine)  # nothing of the cancelled request is left behind
        assert "Paris" in text

        engine.proc.kill()  # a crashed worker is restarted for the next request
        engine.proc.wait()
        text, _ = ask(engine)
        assert "Paris" in text
    finally:
        engine.close()


def test_worker_load_failure_is_a_message(monkeypatch, tmp_path):
    require("openvino")
    from cpu_backend import intel

    real = intel.IntelWorkerEngine._start

    def broken(self):  # a model folder that vanished, and no converted model cached for it
        self.command[self.command.index("--folder") + 1] = str(tmp_path / "missing")
        self.command[self.command.index("--work") + 1] = str(tmp_path / "work")
        real(self)

    monkeypatch.setattr(intel.IntelWorkerEngine, "_start", broken)
    with pytest.raises(RequestError, match=r"could not load .*smollm2-135m"):
        intel.OpenVINOEngine(DEFAULT_MODEL, "bf16")


def test_chat_service_streams_through_openvino():
    require("openvino")
    service = ChatService()
    updates = list(service.chat(QUESTION, [], ChatSettings(backend="openvino", scheme="bf16", sampling=GREEDY)))
    assert "Paris" in updates[-1].text and updates[-1].done and updates[-1].backend == "openvino"
    assert updates[-1].timings.tpot_ms > 0
    service.engine("openvino", DEFAULT_MODEL, "bf16").close()


def test_default_backend_follows_the_measurement(monkeypatch):
    require("openvino")
    monkeypatch.delenv("Q8CHAT_BACKEND", raising=False)
    assert default_backend() == "cpu"  # our engine measured faster than OpenVINO; IPEX (legacy) never by default
    monkeypatch.setenv("Q8CHAT_BACKEND", "ipex")
    assert default_backend() == "ipex"
    monkeypatch.setenv("Q8CHAT_BACKEND", "tpu")
    with pytest.raises(RequestError, match="Q8CHAT_BACKEND"):
        default_backend()


def test_missing_environment_is_explained(monkeypatch, tmp_path):
    from cpu_backend import intel

    monkeypatch.setattr(intel, "ROOT", tmp_path)
    monkeypatch.delenv("Q8CHAT_BACKEND", raising=False)
    assert default_backend() == "cpu"
    for runtime in RUNTIMES:
        ok, reason = backend_availability(runtime)
        assert not ok and f"make venv-{runtime}" in reason
    assert "legacy" in backend_availability("ipex")[1] and "security" in backend_availability("ipex")[1]
    with pytest.raises(RequestError, match="make venv-openvino"):
        ChatService().engine("openvino", DEFAULT_MODEL, "bf16")
    import app

    choices, notes = app.backend_choices()
    assert ("IPEX (legacy) (unavailable)", "ipex") in choices and "OpenVINO unavailable" in notes
    with pytest.raises(RequestError, match="choose one of"):
        intel.OpenVINOEngine(DEFAULT_MODEL, "w8a8-fp8")
