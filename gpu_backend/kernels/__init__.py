"""Triton kernels of the GPU backend. Each one has a float reference in tests/test_gpu_*.py."""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter keeps scalar kernel arguments as 1-element arrays and converts them
    # with int(array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays ..."): loops with a
    # run-time bound fail. Index the single element instead. Interpreter (CPU tests) only.
    import triton.runtime.interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

# Programmatic dependent launch (sm90+): each kernel is launched while its predecessor drains and waits for
# it in-kernel (``enter``) before touching anything the predecessor writes or reads, so the launch and
# ramp-up of the ~300 small kernels of a decode step overlap the previous kernel's tail. False: plain
# stream order (the benchmark times both).
PDL = os.environ.get("Q8CHAT_PDL", "1") != "0"
_capable: dict[int, bool] = {}


def use_pdl(t: torch.Tensor) -> bool:
    """Launch kernels touching ``t`` with PDL: CUDA, sm90+, not the interpreter, not switched off."""
    if not (PDL and t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    dev = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if dev not in _capable:
        _capable[dev] = torch.cuda.get_device_capability(dev)[0] >= 9
    return _capable[dev]


@triton.jit
def enter(GDC: tl.constexpr):
    """Wait for the previous kernel's memory (PDL), then let the next kernel launch."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
