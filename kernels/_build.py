"""What a launcher compiles, as data: the build specs of the Hopper build check (kernels/_aot.py).

A leaf module: the kernel modules import it for their ``build_specs()``, and ``_aot`` imports the kernel
modules; nothing here imports either.
"""

import inspect
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

# The Triton element type of each logits / operand dtype the launchers take.
TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Integer arguments that are not strides: sizes, a label sentinel, offsets into a row or a split.
_INT_ARGS = frozenset({"T", "V", "N", "H", "ignore_index", "row_start", "v_per_split"})


@dataclass
class KernelBuild:
    """One compilation a launcher performs: kernel, argument types, constexprs and launch options."""

    kernel: object
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict
    divisible: list = field(default_factory=list)  # arguments Triton's launcher marks divisible by 16
    num_warps: int = 4
    num_stages: int = 3
    tensor_cores: bool = False  # a bf16/fp16 tl.dot kernel: sm_90 must use wgmma (HGMMA), sm_80 HMMA
    streams_rows: bool = False  # a memory-bound streaming kernel: its global loads must be vectorized
    narrow_loads: int = 0  # sub-32-bit scalar loads the kernel legitimately makes (e.g. one label logit)
    streams_out: bool = False  # it also streams a [N, V] output: its global stores must be vectorized
    label: str = ""

    @property
    def jit_function(self):
        """The ``JITFunction`` under any ``triton.heuristics`` / ``autotune`` wrappers."""
        return jit_function(self.kernel)

    @property
    def name(self) -> str:
        return self.jit_function.fn.__name__


def jit_function(kernel) -> "triton.runtime.JITFunction":
    fn = kernel
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def signature(kernel, constexprs: dict, **types: str) -> dict:
    """The Triton signature of ``kernel``, in its own argument order, derived from the argument names.

    - ``tl.constexpr`` parameters, and the arguments ``constexprs`` specialises (a ``None`` pointer the
      launcher passes for an absent input, a unit stride): ``"constexpr"``;
    - ``types[name]`` where given (the pointers to the input dtype, int64 labels, a uint8 mask);
    - any other ``*_ptr``: ``"*fp32"`` (the float32 statistics, outputs and per-token inputs);
    - ``stride_*`` and the sizes and integer arguments of ``_INT_ARGS``: ``"i32"``;
    - any other name: ``"fp32"`` (a runtime float: temperature, clip range, beta).
    """
    fn = kernel  # the Python function under the jit (or interpreter) and heuristics wrappers
    while not inspect.isfunction(fn):
        fn = fn.fn
    params = inspect.signature(fn).parameters
    unknown = set(types) - set(params)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    sig = {}
    for name, param in params.items():
        if param.annotation in (tl.constexpr, "tl.constexpr") or name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name.startswith("stride") or name in _INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def kernel_build(kernel, constexprs: dict, types: dict, *, sizes: tuple[str, ...], absent: tuple[str, ...] = (),
                 **options) -> KernelBuild:  # fmt: skip
    """The :class:`KernelBuild` of ``kernel`` specialised by ``constexprs`` and by the pointers ``absent`` (the
    ``None`` the launcher passes for an absent input): its :func:`signature` with ``types``, and divisible by 16
    (as Triton's launcher marks them at the usual shapes) every pointer it passes, every runtime stride and the
    sizes ``sizes``; ``options`` are the other fields."""
    constexprs = {**constexprs, **dict.fromkeys(absent)}
    sig = signature(kernel, constexprs, **types)
    divisible = [n for n, ty in sig.items()
                 if ty != "constexpr" and (ty.startswith("*") or n.startswith("stride") or n in sizes)]  # fmt: skip
    return KernelBuild(kernel=kernel, signature=sig, constexprs=constexprs, divisible=divisible, **options)
