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
