"""Ahead-of-time compilation of every kernel for NVIDIA targets, and a reading of the cubin.

A profiler without a GPU: Triton compiles to PTX and, with the ``ptxas`` in its wheel, to a cubin on a
CPU-only machine; the ``cuobjdump`` in the same wheel reads registers, spills (``LOCAL``), shared memory
and the SASS. ``python -m rlhf_fast.kernels._aot`` prints one JSON line per kernel build. It must run in a
process without ``TRITON_INTERPRET=1``, since interpreted kernels cannot be compiled.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import triton

from ._build import KernelBuild

ARCHS = (90, 80)


def all_builds() -> list:
    """Every kernel build of the package: each kernel module's ``build_specs()`` (data: kernels/_build.py)."""
    from . import full_kl, gae, linear_logprobs, logprobs, ppo, preference, sampling, truncation

    return (
        logprobs.build_specs()
        + linear_logprobs.build_specs()
        + full_kl.build_specs()
        + ppo.build_specs()
        + gae.build_specs()
        + preference.build_specs()
        + sampling.build_specs()
        + truncation.build_specs()
    )


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_build(build: KernelBuild, arch: int) -> bytes:
    """Compile one build for ``sm_<arch>`` and return the cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(build.signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in build.divisible}
    src = ASTSource(fn=build.jit_function, signature=build.signature, constexprs=build.constexprs, attrs=attrs)
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["cubin"]


def inspect_cubin(cubin: bytes, path: str) -> dict:
    """Registers, spills, shared memory and the kinds of global loads of a cubin."""
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    loads = dict(Counter(re.findall(r"\b(LDG\.E[.\w]*)", sass)))
    stores = dict(Counter(re.findall(r"\b(STG\.E[.\w]*)", sass)))
    mma = sorted(set(re.findall(r"\b(HGMMA|HMMA)[.\w]*", sass)))
    return {
        "registers": int(res.get("REG", -1)),
        "stack": int(res.get("STACK", -1)),
        "shared": int(res.get("SHARED", -1)),
        "local": int(res.get("LOCAL", -1)),
        "global_loads": loads,
        "global_stores": stores,
        "mma": mma,
    }


def report(tmpdir: str) -> list:
    """Compile every build for every arch in ``ARCHS`` and inspect it; one dict per (build, arch)."""
    rows = []
    for i, build in enumerate(all_builds()):
        for arch in ARCHS:
            row = {
                "kernel": build.name,
                "config": build.label,
                "arch": arch,
                "streams_rows": build.streams_rows,
                "narrow_loads_allowed": build.narrow_loads,
                "streams_out": build.streams_out,
                "tensor_cores": build.tensor_cores,
            }
            try:
                row.update(inspect_cubin(compile_build(build, arch), os.path.join(tmpdir, f"k{i}_{arch}.cubin")))
            except Exception as exc:  # reported, and failed, by the test
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
    return rows


def main() -> None:
    import tempfile

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    with tempfile.TemporaryDirectory() as tmp:
        for row in report(tmp):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
