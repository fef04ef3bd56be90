"""Triton kernels and their launchers, installed as ``rlhf_fast.kernels``.

This layer owns tensor layouts and kernel launches only: no autograd, no input validation beyond what
the launch itself needs. ``rlhf_fast`` builds the public ops on top of it.

``INTERPRET`` is true when ``TRITON_INTERPRET=1`` was set before these kernels were defined: then every
``@triton.jit`` function here is run by the Triton interpreter on CPU tensors and cannot be compiled.

This folder is never the top-level package ``kernels``. That name belongs to Hugging Face's ``kernels``
(which ``transformers`` imports), and a script or ``python -m pytest`` run from the repository root puts
the root first on ``sys.path``, where this folder would shadow it. Imported under that name, this file
loads the installed ``kernels`` package in its place (``sys.modules`` then holds theirs, which ``import``
returns), or raises ``ModuleNotFoundError`` when none is installed; it never runs as ``kernels`` itself.
"""

import os
import sys


def _hand_over_top_level_name() -> None:
    """Load the installed top-level ``kernels`` package in place of this folder, or raise ModuleNotFoundError."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec(__name__, others)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {__name__!r} (the folder {os.path.dirname(__file__)} is rlhf_fast's kernels, "
            "installed as rlhf_fast.kernels, not a top-level package)", name=__name__)  # fmt: skip
    theirs = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = theirs  # the import system returns what sys.modules holds once this file ends
    try:
        spec.loader.exec_module(theirs)
    except BaseException:
        del sys.modules[__name__]
        raise


if __name__ != "rlhf_fast.kernels":
    _hand_over_top_level_name()

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


if INTERPRET and __name__ == "rlhf_fast.kernels":
    _interpreter_index_compat()

