"""Real q8chat servers for the tests: ``python app.py`` in a subprocess on a free loopback port.

``shared(...)`` starts one server per distinct (args, env) and reuses it across test modules; every server
is stopped when the test session ends. ``start`` waits (bounded) until /healthz says the start-up is done.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "q8chat-test-key"  # the shared server's /v1 key: proves keys are checked and passed on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return json.loads(r.read())


class AppServer:
    def __init__(self, args: tuple[str, ...] = (), env: dict[str, str] | None = None, wait_ready: bool = True):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="q8chat-app-", suffix=".log", delete=False)
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "app.py", "--port", str(self.port), *args],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.wait(ready=wait_ready)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def health(self) -> dict | None:
        try:
            return get_json(self.url + "healthz", timeout=2)
        except OSError:
            return None

    def wait(self, ready: bool = True, timeout: float = 180.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            health = self.health()
            if health is not None and (health["ready"] or not ready):
                return health
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"app not {'ready' if ready else 'up'} in {timeout:.0f} s:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


_servers: dict[tuple, AppServer] = {}


def shared(args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> AppServer:
    """One server per configuration for the whole test session (the default one requires API_KEY on /v1)."""
    env = {"Q8CHAT_API_KEY": API_KEY, **(env or {})}
    key = (tuple(args), tuple(sorted(env.items())))
    server = _servers.get(key)
    if server is None or server.proc.poll() is not None:
        server = _servers[key] = AppServer(args, env)
    return server


@atexit.register
def _stop_all() -> None:
    for server in _servers.values():
        server.stop()
