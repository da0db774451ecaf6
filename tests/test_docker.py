"""The Dockerfile, tested without a Docker engine (none runs here or in CI).

hadolint lints it; the facts a Space needs (port 7860, uid 1000, health check, CPU/CUDA build argument) are
read from it; and its install and start steps are executed as written: every RUN after ``USER`` runs in a
fresh virtualenv under a temporary home with the Dockerfile's own ENV, on a copy of the build context
filtered by .dockerignore, then CMD starts the server and HEALTHCHECK and an ``openai`` client talk to it.

Two substitutions, both said here: PyTorch's CPU wheel index (unreachable from this machine) is replaced
by the package index pip uses here, and Q8CHAT_CACHE keeps the test session's cache so the embedded model
is not converted a second time (tests/test_app.py covers the conversion).
"""

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import appserver

pytestmark = pytest.mark.slow  # installs the image's steps into a fresh venv

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def expand(value: str, env: dict[str, str]) -> str:
    for name in sorted(env, key=len, reverse=True):
        value = value.replace("${" + name + "}", env[name]).replace("$" + name, env[name])
    return value


def ignored(rel: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[0], p) for p in patterns)


def copy_context(dest: Path) -> None:
    patterns = [p.strip().replace("**/", "") for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_dir() or ignored(rel, patterns) or any(ignored(part, patterns) for part in rel.split("/")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / rel)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_serves_7860_as_uid_1000_with_healthcheck_and_a_cuda_argument():
    steps = instructions()
    words = [w for w, _ in steps]
    args = dict(rest.split("=", 1) for w, rest in steps if w == "ARG" and "=" in rest)
    assert args["TORCH_VARIANT"] == "cpu" and "download.pytorch.org/whl/cpu" in args["TORCH_CPU_INDEX"]
    run = " ".join(rest for w, rest in steps if w == "RUN")
    assert '"$TORCH_VARIANT" = "cpu"' in run and "--uid 1000" in run
    assert ("USER", "1000") in steps and words.index("USER") < words.index("CMD")
    assert ("EXPOSE", "7860") in steps
    env = " ".join(rest for w, rest in steps if w == "ENV")
    assert "GRADIO_SERVER_PORT=7860" in env and "GRADIO_SERVER_NAME=0.0.0.0" in env
    assert json.loads(dict(steps)["CMD"]) == ["python", "app.py"]
    assert "serving.healthcheck" in dict(steps)["HEALTHCHECK"]
    patterns = (ROOT / ".dockerignore").read_text().split()
    for private in (".git", ".venv*", "artifacts"):
        assert private in patterns


def test_dockerfile_install_and_start_steps_work_in_a_fresh_virtualenv(tmp_path, embedded_folder):
    home, app_dir = tmp_path / "home", tmp_path / "home" / "app"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    for name in ("PIP_FIND_LINKS", "PIP_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_CONFIG_FILE", "SSL_CERT_FILE"):
        if name in os.environ:  # this machine's package sources
            env[name] = os.environ[name]
    build_args = {"TORCH_CPU_INDEX": "https://pypi.org/simple"}  # stands in for PyTorch's CPU index
    after_user, workdir, healthcheck, cmd = False, app_dir, None, None
    python = shutil.which("python3.11") or sys._base_executable  # the image's python, not this venv's
    env["PATH"] = f"{Path(python).parent}:{env['PATH']}"
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, default = rest.split("=", 1)
            env[name] = build_args.get(name, default)
        elif word == "USER":
            after_user = True
        elif word == "ENV":
            for pair in shlex.split(rest):
                name, value = pair.split("=", 1)
                value = value.replace("/home/user", str(home))
                env[name] = expand(value, env)
        elif word == "WORKDIR":
            workdir = Path(rest.replace("/home/user", str(home)))
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "COPY":
            sources = [s for s in shlex.split(rest) if not s.startswith("--")][:-1]
            if sources == ["."]:
                copy_context(workdir)
            else:
                for s in sources:
                    shutil.copy2(ROOT / s, workdir / s)
        elif word == "RUN" and after_user:
            done = subprocess.run(
                ["bash", "-c", rest], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, f"RUN {rest}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        elif word == "HEALTHCHECK":
            healthcheck = json.loads(rest.split("CMD", 1)[1])
        elif word == "CMD":
            cmd = json.loads(rest)
    assert (home / "venv" / "bin" / "python").exists() and env["VIRTUAL_ENV"] == str(home / "venv")
    assert not (workdir / ".venv").exists() and not (workdir / "tests").exists()  # .dockerignore applied

    port = appserver.free_port()
    run_env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    run_env["Q8CHAT_CACHE"] = str(Path(embedded_folder).parents[1])  # reuse the session's converted model
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(cmd, cwd=workdir, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 240
        health = None
        while time.time() < deadline and server.poll() is None:
            try:
                health = appserver.get_json(url + "healthz", timeout=2)
                if health["ready"]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert health and health["ready"], (tmp_path / "server.log").read_text()[-3000:]
        check = subprocess.run(healthcheck, cwd=workdir, env=run_env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        import openai

        client = openai.OpenAI(base_url=url + "v1", api_key="none", max_retries=0, timeout=120)
        answer = client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one short sentence."}],
            temperature=0,
            max_tokens=16,
        )
        assert "Paris" in answer.choices[0].message.content
    finally:
        server.terminate()
        server.wait(timeout=30)
    check = subprocess.run(healthcheck, cwd=workdir, env=run_env, capture_output=True, text=True, timeout=30)
    assert check.returncode == 1 and "unhealthy" in check.stdout  # and it notices a server that is gone
