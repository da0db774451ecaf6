"""Pick the thread count from physical cores (hyper-threads slow GEMMs down)."""

from __future__ import annotations

import os
from pathlib import Path


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
