"""This CPU as /proc/cpuinfo describes it (name, flags, physical cores), and the thread count picked from its
physical cores (hyper-threads slow GEMMs down)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_model_and_flags() -> tuple[str | None, set[str]]:
    """(model name, feature flags) of the first CPU listed; (None, empty) where /proc/cpuinfo cannot be read."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name, flags


def physical_cores() -> int:
    allowed = os.sched_getaffinity(0)
    cores: set[tuple[str, str]] = set()
    try:
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if line.strip():
                key, _, value = line.partition(":")
                block[key.strip()] = value.strip()
                continue
            if block and int(block.get("processor", -1)) in allowed:
                cores.add((block.get("physical id", "0"), block.get("core id", block.get("processor", "0"))))
            block = {}
    except (OSError, ValueError):
        pass
    return max(1, len(cores) or len(allowed))


def configure_threads(threads: int | None = None) -> int:
    import torch

    n = threads or int(os.environ.get("Q8CHAT_THREADS", 0)) or physical_cores()
    torch.set_num_threads(n)
    return n
