"""Triton kernels and their launchers, installed as ``rlhf_fast.kernels``.

This layer owns tensor layouts and kernel launches only: no autograd, no input validation beyond what
the launch itself needs. ``rlhf_fast`` builds the public ops on top of it.

``INTERPRET`` is true when ``TRITON_INTERPRET=1`` was set before these kernels were defined: then every
``@triton.jit`` function here is run by the Triton interpreter on CPU tensors and cannot be compiled.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
