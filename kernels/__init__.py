"""Triton kernels and their launchers, installed as ``rlhf_fast.kernels``.

This layer owns tensor layouts and kernel launches only: no autograd, no input validation beyond what
the launch itself needs. ``rlhf_fast`` builds the public ops on top of it.

``INTERPRET`` is true when ``TRITON_INTERPRET=1`` was set before these kernels were defined: then every
``@triton.jit`` function here is run by the Triton interpreter on CPU tensors and cannot be compiled.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_index_compat() -> None:
    """Triton < 3.7's interpreter turns a scalar kernel argument into ``int(array([v]))`` when it bounds a
    ``range`` (``for start in range(0, V, BLOCK_V)``), which NumPy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"). Triton 3.7+ squeezes the array first; do the same on older ones.
    Interpreter only: compiled kernels never call ``__index__``."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_rlhf_fast_squeezes", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._rlhf_fast_squeezes = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _interpreter_index_compat()

