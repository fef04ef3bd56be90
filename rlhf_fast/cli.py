"""The ``rlhf-fast`` command (also ``python -m rlhf_fast``).

    rlhf-fast train sft|rm|ppo|dpo|best-of-n [--config PATH] [key=value ...]
    rlhf-fast demo [--config PATH] [key=value ...]
    rlhf-fast bench [NAME [ARGS ...]]

Each trainer is a module with a config dataclass ``Config`` and ``train(cfg) -> dict`` (the demo:
``run(cfg) -> dict``), imported only when asked for. A ``Config`` with a ``validate()`` method is checked
before the run, and its ``ValueError`` is printed as a one-line error, as is a ``UserError``
(``rlhf_fast.train.errors``) raised inside a run: a bad option, data file, model path or out_dir. Other
exceptions keep their traceback (they are bugs). ``--print-config`` prints the config that would run,
as YAML, and exits: ``rlhf-fast train ppo --print-config > ppo.yaml`` starts a config file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Sequence

# command name -> (module, entry function)
TRAINERS = {
    "sft": "rlhf_fast.train.sft",
    "rm": "rlhf_fast.train.reward",
    "ppo": "rlhf_fast.train.ppo",
    "dpo": "rlhf_fast.train.dpo",
    "best-of-n": "rlhf_fast.train.best_of_n",
}
DEMO = "rlhf_fast.demo"
BENCH_PACKAGE = "rlhf_fast.benchmarks"  # benchmarks/ in the repository
BENCH_PREFIX = "bench_"
GPU_SUITE = "gpu"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    from .train.config import add_config_args

    parser = argparse.ArgumentParser(
        prog="rlhf-fast",
        description="RLHF on fused Triton kernels: lean trainers, the end-to-end demo, benchmarks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,demo,bench}")
    sub.required = True

    train = sub.add_parser("train", help="run a trainer", description="Run one trainer with a config.")
    train_sub = train.add_subparsers(dest="trainer", metavar="{" + ",".join(TRAINERS) + "}")
    train_sub.required = True
    for name, module in TRAINERS.items():
        p = train_sub.add_parser(name, help=f"{module}.train", description=(
            f"Run {module}.train(cfg); cfg is {module}.Config from --config and key=value overrides. "
            "--print-config shows every key with its value."))
        add_config_args(p)
        p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    demo = sub.add_parser("demo", help="SFT -> reward model -> PPO on a synthetic task, on CPU in minutes",
                          description=f"Run {DEMO}.run(cfg): the whole pipeline from nothing.")
    add_config_args(demo)
    demo.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")

    bench = sub.add_parser("bench", help="run a benchmark or the GPU suite (gpu), or list them",
                           description="Run rlhf_fast.benchmarks.bench_NAME (or the GPU suite: gpu) from any "
                           "directory; results go under the current directory.")
    bench.add_argument("name", nargs="?", help="benchmark name, e.g. logprobs (none: list them)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def _import(module_name: str, what: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise CLIError(f"{what} is not available: module {module_name} does not exist in this "
                           "installation of rlhf_fast") from None
        raise CLIError(f"{what} ({module_name}) needs the module {e.name!r}, which is not installed") from None


def _run_config_command(module_name: str, entry: str, what: str, args: argparse.Namespace) -> int:
    from .train.config import config_from_args, config_to_dict

    module = _import(module_name, what)
    for attr in ("Config", entry):
        if not hasattr(module, attr):
            raise CLIError(f"{module_name} has no {attr!r}: a trainer module defines a Config dataclass and "
                           f"{entry}(cfg)")
    try:
        cfg = config_from_args(module.Config, args)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.print_config:  # before validate(): a template may still lack its required paths
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if callable(getattr(cfg, "validate", None)):  # a config that checks itself: say what is wrong, briefly
        try:
            cfg.validate()
        except ValueError as e:
            raise CLIError(str(e)) from None
    result = getattr(module, entry)(cfg)
    if result is not None and os.environ.get("RANK", "0") == "0":  # under torchrun: once, not per process
        print(json.dumps(result, indent=2, default=str))
    return 0


def list_benchmarks() -> list[str]:
    """Names of the shipped benchmarks (``rlhf_fast.benchmarks.bench_*``, without the prefix), and ``gpu``."""
    try:
        package = importlib.import_module(BENCH_PACKAGE)
    except ModuleNotFoundError:
        return []
    names = [m.name[len(BENCH_PREFIX):] for m in pkgutil.iter_modules(package.__path__)
             if m.name.startswith(BENCH_PREFIX)]
    return sorted(names + [GPU_SUITE])


def _bench(name: str | None, extra: Sequence[str]) -> int:
    names = list_benchmarks()
    if not names:
        raise CLIError(f"no benchmarks found: {BENCH_PACKAGE} is missing from this installation of rlhf_fast")
    if name is None:
        print("benchmarks (rlhf-fast bench NAME [--help]); results go to benchmarks/results/<device>/ "
              "under the current directory:")
        for n in names:
            print(f"  {n}" + ("   (the GPU suite: environment, correctness, ops, trainer, summary)"
                              if n == GPU_SUITE else ""))
        return 0
    short = name[len(BENCH_PREFIX):] if name.startswith(BENCH_PREFIX) else name
    if short not in names:
        raise CLIError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    module = _import(f"{BENCH_PACKAGE}.{'gpu_suite' if short == GPU_SUITE else BENCH_PREFIX + short}",
                     f"benchmark {short!r}")
    module.main(list(extra))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from .train.errors import UserError

    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _run_config_command(TRAINERS[args.trainer], "train", f"trainer {args.trainer!r}", args)
        if args.command == "demo":
            return _run_config_command(DEMO, "run", "the demo", args)
        return _bench(args.name, args.args)
    except (CLIError, UserError) as e:  # what the user gave is wrong: one line. Anything else is a bug: traceback
        print(f"rlhf-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
