"""Process-wide runtime settings for long-running servers.

oneDNN (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and PyTorch's ideep wrapper (``LRU_CACHE_CAPACITY``) each keep
up to 1024 kernels per input shape by default. A prefill of a prompt length not seen before adds one set
(~1.5-3 MB on the embedded model), and a conversation rarely sends the same length twice, so a server's
resident memory grew by ~3 MB per new prompt length until the caches filled (bench/soak.py measured +8.4%
over 200 turns before this cap, flat after it). Decode runs a handful of shapes, which stay cached at any
capacity above ~10, and a new prefill length misses the cache either way, so a small cap costs no speed.
Both variables are read when the first kernel is created, so this must run before a model first runs;
an operator's own values win.
"""

from __future__ import annotations

import os

KERNEL_CACHE_CAPACITY = 32
CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    for name in CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
