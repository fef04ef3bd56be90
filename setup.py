"""rlhf_fast: fused Triton kernels for RLHF training.

``kernels/`` is shipped inside the package as ``rlhf_fast.kernels``: a top-level module named
``kernels`` would shadow the package of that name that ``transformers`` probes for.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["rlhf_fast", "rlhf_fast.*"])
packages += ["rlhf_fast.kernels"] + [f"rlhf_fast.kernels.{p}" for p in find_packages("kernels")]
# The benchmarks and the GPU suite ship as ``rlhf_fast.benchmarks`` (``rlhf-fast bench`` runs them from any
# directory); only their modules: committed results (benchmarks/results/) stay in the repository.
packages += ["rlhf_fast.benchmarks"]

setup(
    name="rlhf_fast",
    version="0.1.0",
    description="Fused Triton kernels for RLHF: log-probs, entropy, KL, PPO and preference losses",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"rlhf_fast.kernels": "kernels", "rlhf_fast.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",  # tested: 3.6 (the GPU image), 3.9 (CI); see tests/test_build_hopper.py
        "numpy",
        # the trainers (rlhf_fast.train); none of these depends on torch, so no CUDA build is pulled in
        "transformers>=4.45",
        "datasets",
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",  # the trainers' and the demo's curves.png
    ],
    entry_points={"console_scripts": ["rlhf-fast=rlhf_fast.cli:main"]},
    extras_require={
        # the harness tests run a benchmark end to end: its plot and its memory probe
        # TRL: the drop-in and policy-loss tests compare against stock TRL itself (skipped without it)
        # peft: the TRL GRPO drop-in with a LoRA policy (its reference scored through the policy, adapter off)
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "psutil", "trl>=1.16,<1.17", "peft"],
        "bench": ["matplotlib", "pytest-benchmark", "psutil"],
        "peers": ["liger-kernel", "trl", "cut-cross-entropy"],
        # rlhf_fast.integrations: drop-ins for these trainers (the versions their tests ran against)
        "trl": ["trl>=1.16,<1.17"],
        "verl": ["verl>=0.9,<0.10"],
        "openrlhf": ["openrlhf>=0.11,<0.12"],
    },
    license="Apache-2.0",
)
