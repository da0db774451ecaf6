"""Hugging Face ZeroGPU Spaces: the GPU exists only inside ``@spaces.GPU`` calls.

On a ZeroGPU Space (the platform sets ``SPACES_ZERO_GPU``) the Gradio process has no usable CUDA: each call
of a function decorated with ``spaces.GPU`` runs in a worker process that holds a GPU slice (an H200 share)
for at most the call's ``duration`` seconds, and what it returns or yields is pickled back. So the GPU
engine keeps everything CUDA in that worker: it loads the weights, allocates the KV cache and captures its
CUDA graphs inside the first call (no torch.compile: ZeroGPU allows ahead-of-time compilation only), keeps
them there for the calls that follow, and yields plain ``TokenEvent`` objects (ints and strings).

Off Spaces nothing changes: ``spaces`` is imported only where ``SPACES_ZERO_GPU`` is set or the package is
installed (its decorator is effect-free outside ZeroGPU), otherwise ``gpu_call`` returns the function itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

# what a ZeroGPU slice is (H200, compute capability 9.0): the main process cannot ask CUDA
ZERO_GPU_CAPABILITY = (9, 0)
# seconds asked for a request: a cold worker loads the weights and captures graphs first; then prefill and
# decode (generous per-token figures: a visitor's request must not be cut off mid-answer)
COLD_START_S = 90.0
BASE_S = 5.0
PER_NEW_TOKEN_S = 0.03
PER_PROMPT_TOKEN_S = 0.0005
MAX_DURATION_S = 300


def zero_gpu() -> bool:
    """Running on a ZeroGPU Space (the platform's environment variable)."""
    return os.environ.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "true", "yes")


def _installed() -> bool:
    if sys.modules.get("spaces") is not None:
        return True
    try:
        return importlib.util.find_spec("spaces") is not None
    except (ImportError, ValueError):
        return False


def _spaces():
    if not zero_gpu() and not _installed():
        return None
    try:
        import spaces
    except ImportError as e:
        if zero_gpu():
            raise RuntimeError(
                "SPACES_ZERO_GPU is set but the `spaces` package is missing: add `spaces` to requirements.txt"
            ) from e
        return None
    return spaces


def gpu_call(fn: Callable, duration: Callable[..., float]) -> Callable:
    """``fn`` as a ZeroGPU task (``spaces.GPU`` with a per-call duration computed from the call's arguments)
    where ``spaces`` is importable; ``fn`` itself elsewhere."""
    spaces = _spaces()
    if spaces is None:
        return fn
    return spaces.GPU(duration=duration)(fn)


def duration_estimate(prompt_tokens: int, max_new_tokens: int, warm: bool) -> int:
    """Seconds of GPU to ask for one generation."""
    s = BASE_S + PER_NEW_TOKEN_S * max_new_tokens + PER_PROMPT_TOKEN_S * prompt_tokens
    if not warm:
        s += COLD_START_S
    return int(min(MAX_DURATION_S, max(10.0, s)))
