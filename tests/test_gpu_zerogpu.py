"""ZeroGPU integration, CPU-only: the GPU generation path runs through ``spaces.GPU`` (a stand-in module here:
the real one needs the Spaces platform), the main process never touches CUDA, only plain events come back,
and machines without ``spaces`` and without SPACES_ZERO_GPU are unaffected."""

import importlib
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

import gpu_backend  # noqa: E402
from gpu_backend import zerogpu  # noqa: E402
from models.backend import SamplingParams, TokenEvent  # noqa: E402


class FakeSpaces(types.ModuleType):
    """``spaces.GPU(duration=callable)``: records each call's requested duration, then runs the function (as
    ZeroGPU does in its worker, and generators stream)."""

    def __init__(self) -> None:
        super().__init__("spaces")
        self.durations: list[int] = []
        self.decorated: list[str] = []

    def GPU(self, duration):  # noqa: N802  (the package's name)
        def deco(fn):
            self.decorated.append(fn.__name__)

            def task(*args, **kwargs):
                self.durations.append(duration(*args, **kwargs))
                yield from fn(*args, **kwargs)

            return task

        return deco


class FakeGenerator:
    """What runs in the GPU worker: ``Generator.start`` over a decoder (here: fixed token ids)."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = 0

    def start(self, prompt_ids, params):
        self.calls += 1

        def tokens():
            try:
                while True:
                    yield 1
                    yield 2
            finally:
                self.closed += 1

        return 0, tokens()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "Hi": 1, "there": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = Whitespace(), decoders.WordPiece()
    return types.SimpleNamespace(backend_tokenizer=tok, eos_token_id=None)


@pytest.fixture
def zero_space(monkeypatch, tmp_path):
    """A ZeroGPU Space's main process: SPACES_ZERO_GPU set, a `spaces` module, and CUDA that must not be used."""
    import gpu_backend.engine as engine

    fake = FakeSpaces()
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    monkeypatch.setitem(sys.modules, "spaces", fake)

    def no_cuda(*a, **k):
        raise AssertionError("the ZeroGPU main process touched CUDA")

    for name in ("is_available", "get_device_capability", "get_device_name", "current_device"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    engine = importlib.reload(engine)  # decorates its GPU entry point again, now with `spaces`
    cfg = types.SimpleNamespace(max_position_embeddings=4096, eos_token_ids=[])
    monkeypatch.setattr(engine, "prepare_checkpoint", lambda model, scheme: (tmp_path, cfg))
    monkeypatch.setattr(engine, "load_tokenizer", lambda folder: tiny_tokenizer())
    built: list[tuple] = []
    gen = FakeGenerator()

    def load(key):  # what runs inside the GPU worker on its first call
        built.append(key)
        engine._GENERATORS[key] = gen
        return gen

    monkeypatch.setattr(engine, "_load_generator", load)
    yield engine, fake, built, gen, tmp_path
    engine._GENERATORS.clear()
    engine._WARM.clear()
    monkeypatch.undo()
    importlib.reload(engine)


def test_generation_runs_inside_spaces_gpu(zero_space):
    engine, fake, built, gen, folder = zero_space
    assert fake.decorated == ["_tokens"]
    eng = engine.GPUEngine("some-model", "w8a8-fp8", max_context=2048)  # no CUDA touched (fixture)
    assert eng.context_length == 2048 and built == []  # nothing built in the main process
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    events = list(eng.generate_ids([1, 2, 3], params))
    assert "".join(e.text for e in events) == "Hi there Hi there Hi" and events[-1].finished
    assert all(isinstance(e, TokenEvent) and isinstance(e.token_id, int | None) for e in events)
    assert built == [(str(folder), "w8a8-fp8", None, 2048)] and gen.calls == 1 and gen.closed == 1
    list(eng.generate_ids([1, 2, 3], params))  # the worker keeps its generator: no second build
    assert len(built) == 1 and gen.calls == 2 and gen.closed == 2
    cold, warm = fake.durations
    assert cold == zerogpu.duration_estimate(3, 5, warm=False) and warm == zerogpu.duration_estimate(3, 5, True)
    assert 10 <= warm < cold <= zerogpu.MAX_DURATION_S
    assert engine.GPUEngine.supported_schemes() == gpu_backend.schemes_for(zerogpu.ZERO_GPU_CAPABILITY)


def test_zerogpu_validates_scheme_without_cuda(zero_space):
    from models.backend import RequestError

    engine, *_ = zero_space
    assert engine.GPUEngine.availability() == (True, "")
    with pytest.raises(RequestError, match="not available on this ZeroGPU slice"):
        engine.GPUEngine("m", "w4a16")


def test_duration_grows_with_the_request():
    small, large = zerogpu.duration_estimate(10, 64, True), zerogpu.duration_estimate(4000, 2048, True)
    assert 10 <= small < large <= zerogpu.MAX_DURATION_S
    assert zerogpu.duration_estimate(10, 64, False) > small


def test_no_spaces_off_spaces(monkeypatch):
    """Without SPACES_ZERO_GPU and without the package, `spaces` is never imported and the function is itself."""
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "spaces", raising=False)

    def f():
        return 1

    assert zerogpu.gpu_call(f, duration=lambda: 10) is f
    assert "spaces" not in sys.modules and not zerogpu.zero_gpu()


def test_zero_gpu_without_spaces_package_says_what_to_do(monkeypatch):
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails
    with pytest.raises(RuntimeError, match="add `spaces` to requirements.txt"):
        zerogpu.gpu_call(lambda: None, duration=lambda: 10)


def test_off_zerogpu_generation_also_goes_through_the_decorator(monkeypatch):
    """Off ZeroGPU with `spaces` installed (its decorator is effect-free there) the engine's tokens still come
    through the decorated entry point, in this process; closing the stream (Stop) ends it."""
    import gpu_backend.engine as engine

    fake = FakeSpaces()
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    engine = importlib.reload(engine)
    try:
        key = ("folder", "bf16", None, 64)
        gen = engine._GENERATORS[key] = FakeGenerator()
        eng = object.__new__(engine.GPUEngine)
        eng._key = key
        _, tokens = eng.start([1], SamplingParams(), budget=100)
        assert [next(tokens) for _ in range(3)] == [1, 2, 1]
        tokens.close()
        assert gen.closed == 1 and len(fake.durations) == 1
    finally:
        engine._GENERATORS.clear()
        monkeypatch.undo()
        importlib.reload(engine)
