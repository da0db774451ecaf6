"""Security, one test each: weights only through safetensors (no pickle), trust_remote_code never set, model
paths confined to allowed folders, loopback unless told otherwise, no secrets in the server log."""

import ast
import os
import pickle
import secrets
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

import app
from models import registry
from models.registry import MODEL_DIRS_ENV, ModelPathError, resolve
from tests import appserver, page
from tests.quant_fixtures import write_tiny_folder

ROOT = Path(__file__).resolve().parents[1]
UNPICKLERS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
              ("cPickle", "load"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"),
              ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pandas", "read_pickle"), ("pd", "read_pickle"),
              ("shelve", "open"), ("marshal", "loads"), ("marshal", "load")}  # fmt: skip


def source_files() -> list[Path]:
    """Every Python file q8chat ships or runs: all of the tree but virtualenvs, hidden folders and tests."""
    files = []
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).parts
        if parts[0] == "tests" or any(p.startswith(".") for p in parts):
            continue
        files.append(path)
    return files


def findings(source: str, name: str = "<source>") -> list[str]:
    """Unpickling calls, numpy allow_pickle=True and trust_remote_code set to anything but False, by line."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            if (func.value.id, func.attr) in UNPICKLERS:
                out.append(f"{name}:{node.lineno}: {func.value.id}.{func.attr}")
        for kw in node.keywords:
            if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                out.append(f"{name}:{node.lineno}: allow_pickle")
            if kw.arg == "trust_remote_code" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                out.append(f"{name}:{node.lineno}: trust_remote_code={ast.unparse(kw.value)}")
            if kw.arg is None and isinstance(kw.value, ast.Dict):  # **{"trust_remote_code": True}
                for key in kw.value.keys:
                    if isinstance(key, ast.Constant) and key.value in ("trust_remote_code", "allow_pickle"):
                        out.append(f"{name}:{node.lineno}: **{{{key.value!r}: ...}}")
    return out


def scan() -> list[str]:
    return [f for path in source_files() for f in findings(path.read_text(), str(path.relative_to(ROOT)))]


def test_the_scanner_finds_what_it_looks_for():
    planted = (
        "import torch, pickle, numpy as np\n"
        "torch.load('w.pt')\npickle.loads(b'')\nnp.load('a.npy', allow_pickle=True)\n"
        "AutoModel.from_pretrained('x', trust_remote_code=True)\n"
        "AutoTokenizer.from_pretrained('x', **{'trust_remote_code': 1})\n"
        "AutoTokenizer.from_pretrained('x', trust_remote_code=False)\n"
    )
    assert [f.split(": ", 1)[1] for f in findings(planted)] == [
        "torch.load", "pickle.loads", "allow_pickle", "trust_remote_code=True", "**{'trust_remote_code': ...}"
    ]  # fmt: skip


def test_weights_only_through_safetensors_no_pickle_anywhere(embedded_folder, monkeypatch):
    files = source_files()
    assert len(files) > 30 and ROOT / "models" / "weights.py" in files and ROOT / "app.py" in files
    bad = [f for f in scan() if "trust_remote_code" not in f]
    assert not bad, bad

    # and at run time: loading a model never reads a file through an unpickler
    import numpy
    import torch

    from cpu_backend.engine import CPUEngine

    called = []

    def refuse(name):
        def unpickle(*args, **kwargs):
            called.append(name)
            raise AssertionError(f"{name} was called while loading a model")

        return unpickle

    for module, attr in ((torch, "load"), (pickle, "load"), (numpy, "load")):
        monkeypatch.setattr(module, attr, refuse(f"{module.__name__}.{attr}"))
    engine = CPUEngine(registry.DEFAULT_MODEL, "bf16", threads=1, max_context=256)
    assert engine.context_length == 256 and called == []


def test_trust_remote_code_is_never_set(embedded_folder, tmp_path, monkeypatch):
    bad = [f for f in scan() if "trust_remote_code" in f]
    assert not bad, bad

    # at run time: every transformers loader q8chat calls gets trust_remote_code unset or False
    import transformers

    calls = []

    class Stop(Exception):
        pass

    def recorder(kind, then):
        def from_pretrained(*args, **kwargs):
            calls.append((kind, kwargs))
            return then(*args, **kwargs)

        return staticmethod(from_pretrained)

    def stop(*args, **kwargs):
        raise Stop

    for kind in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM"):
        cls = getattr(transformers, kind)
        monkeypatch.setattr(cls, "from_pretrained", recorder(kind, cls.from_pretrained))
    from cpu_backend.engine import CPUEngine

    CPUEngine(registry.DEFAULT_MODEL, "bf16", threads=1, max_context=256)  # a model folder
    assert "AutoTokenizer" in [kind for kind, _ in calls]
    # a .gguf file: the conversion's two loaders (stopped there: their arguments matter, not a 30 s conversion)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", recorder("AutoTokenizer", lambda *a, **k: 0))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorder("AutoModelForCausalLM", stop))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    before = len(calls)
    with pytest.raises(Stop):
        registry.convert_gguf(gguf, tmp_path / "out")
    assert [kind for kind, _ in calls[before:]] == ["AutoTokenizer", "AutoModelForCausalLM"]
    assert all(kwargs.get("trust_remote_code", False) is False for _, kwargs in calls), calls


# ---- model paths confined to allowed folders ----


@pytest.fixture
def folders(tmp_path, embedded_folder, monkeypatch):
    """An allowed folder with a model in it (the only one in $Q8CHAT_MODEL_DIRS) and a model outside it."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    write_tiny_folder(allowed / "tiny", embedded_folder)
    write_tiny_folder(outside / "tiny", embedded_folder)
    monkeypatch.setenv(MODEL_DIRS_ENV, str(allowed))
    return SimpleNamespace(allowed=allowed, outside=outside)


def refused(spec: str) -> str:
    with pytest.raises(ModelPathError) as e:
        resolve(spec)
    assert MODEL_DIRS_ENV in str(e.value) and "outside the folders" in str(e.value)
    return str(e.value)


def test_model_paths_are_confined_to_allowed_folders(folders):
    f = folders
    assert resolve(str(f.allowed / "tiny")) == (f.allowed / "tiny").resolve()
    assert resolve(registry.DEFAULT_MODEL).is_relative_to(registry.cache_dir().resolve())  # the cache: allowed
    refused(str(f.outside / "tiny"))  # a real model, but outside
    refused(str(f.allowed / ".." / "outside" / "tiny"))  # a ".." escape
    refused("../../../../../../etc")
    refused("/etc/passwd")
    refused("~/.ssh")
    refused(str(f.outside / "m.gguf"))
    # the same words whether the path exists or not: nothing is learned about other folders
    assert refused(str(f.outside / "tiny")).replace("tiny", "X") == refused(str(f.outside / "nope")).replace(
        "nope", "X"
    )
    # symlinks are followed before the check: a link inside pointing outside is refused ...
    (f.allowed / "link-out").symlink_to(f.outside / "tiny", target_is_directory=True)
    refused(str(f.allowed / "link-out"))
    # ... and so is a model folder inside whose weights link outside
    sneaky = f.allowed / "sneaky"
    sneaky.mkdir()
    for item in (f.outside / "tiny").iterdir():
        (sneaky / item.name).symlink_to(item)
    refused(str(sneaky))
    # links that stay inside are fine
    (f.allowed / "link-in").symlink_to(f.allowed / "tiny", target_is_directory=True)
    assert resolve(str(f.allowed / "link-in")) == (f.allowed / "tiny").resolve()


@pytest.fixture
def serve(monkeypatch):
    """app.main without a server: what uvicorn.run would get (the environment main() touches is restored)."""
    for name in ("Q8CHAT_REMOTE_URL", "Q8CHAT_REMOTE_MODEL", "Q8CHAT_REMOTE_API_KEY_ENV", MODEL_DIRS_ENV):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    ran = {}
    monkeypatch.setattr("serving.server.create_app", lambda *a, **kw: "app")
    monkeypatch.setattr("uvicorn.run", lambda application, **kw: ran.update(kw))

    def main(*args: str) -> dict:
        ran.clear()
        app.main(list(args))
        return ran

    return main


def test_confinement_reaches_the_page_and_the_operator_can_allow_folders(folders, serve):
    history, box, status = page.ask("hi", model="/etc", max_new=8, session="p")
    assert status.startswith("**Cannot answer:**") and "outside the folders" in status and box == "hi"
    # the operator: python app.py --model-dir DIR (the server itself is not started here)
    refused(str(folders.outside / "tiny"))
    serve("--model-dir", str(folders.outside), "--no-preload")
    assert resolve(str(folders.outside / "tiny")) == (folders.outside / "tiny").resolve()
    assert os.environ[MODEL_DIRS_ENV].split(os.pathsep) == [str(folders.allowed), str(folders.outside.resolve())]


# ---- the server binds loopback unless told otherwise ----


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


@pytest.fixture(scope="module")
def keyed_server(embedded_folder):
    """A real server (no --host) with a /v1 key and a remote backend, itself, reached with a key: one process
    holds both secrets."""
    key = "q8chat-secret-" + secrets.token_hex(8)
    port = appserver.free_port()
    env = {
        "Q8CHAT_API_KEY": key,
        "Q8CHAT_REMOTE_URL": f"http://127.0.0.1:{port}/v1",
        "Q8CHAT_REMOTE_API_KEY": key,
        "Q8CHAT_REMOTE_MODEL": "",  # the model the request names
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(appserver, "free_port", lambda: port)
        server = appserver.AppServer((), env)
    yield server, key
    server.stop()


def test_server_binds_loopback_unless_told_otherwise(keyed_server, serve, monkeypatch):
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)  # a Space sets it to 0.0.0.0; a person does not
    assert serve()["host"] == "127.0.0.1"
    assert serve("--host", "0.0.0.0")["host"] == "0.0.0.0"
    # the real server, started without --host
    server, _ = keyed_server
    assert listening_addresses(server.port) == {"127.0.0.1"}


# ---- no secrets in logs ----


def test_no_secrets_in_the_server_log(keyed_server):
    """After good requests, failed logins, a chat through the remote backend (with its key) and one the
    remote refuses, no key is in the server's log."""
    import httpx
    from gradio_client import Client

    server, key = keyed_server
    wrong_key = "q8chat-wrong-" + secrets.token_hex(8)
    chat = {"model": registry.DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {wrong_key}"}).status_code == 401
        assert http.post("/v1/chat/completions", json=chat).status_code == 401
        ok = http.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text
        remote = {**chat, "model": f"{registry.DEFAULT_MODEL}@remote:remote"}
        r = http.post("/v1/chat/completions", json=remote, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["q8chat"]["backend"] == "remote", r.text
    client = Client(server.url, verbose=False)
    try:
        assert client.predict("Say hi.", backend="remote", scheme="remote", max_new_tokens=4, api_name="/chat")
        with pytest.raises(Exception, match="no-such-model"):  # the remote refuses this one: a failed request
            client.predict(
                "Say hi.", backend="remote", scheme="remote", model="no-such-model", max_new_tokens=4, api_name="/chat"
            )
    finally:
        client.close()  # its heartbeat stream would hold the server's shutdown
    log = server.output()
    assert "q8chat on http://127.0.0.1" in log and f"{server.url}v1/chat/completions" in log, log[-3000:]
    for secret in (key, wrong_key):
        assert secret not in log, f"a key is in the server log: {secret[:14]}..."
