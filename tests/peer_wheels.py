"""Packages the tests read or run but do not install into the environment: fetched once as wheels.

``wheel_site(dist, version)`` is a folder holding ``dist==version`` installed with ``pip install --no-deps
--target`` under ``~/.cache/rlhf_fast`` (``$RLHF_FAST_CACHE``), downloaded on first use and reused after;
where the package registry cannot be reached the calling test is skipped with the reason. Used for the
GPU image's Triton (test_build_hopper.py) and for the peers whose imports pull in heavy dependencies
(verl needs Ray, OpenRLHF DeepSpeed): their tests compile the functions they compare against from the
package's own files, so the files are all they need.
"""

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("RLHF_FAST_CACHE", Path.home() / ".cache" / "rlhf_fast"))


def wheel_site(dist: str, version: str) -> Path:
    """A folder with ``dist==version`` installed in it (``--no-deps --target``), made once; skip if it cannot be."""
    site = CACHE / f"{dist}-{version}-py{sys.version_info.major}{sys.version_info.minor}"
    if (site / ".complete").is_file():
        return site
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        pip = [sys.executable, "-m", "pip"]
        get = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp, f"{dist}=={version}"],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        if get.returncode != 0:
            tail = (get.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"{dist}=={version} could not be downloaded (package registry unreachable?): {tail}")
        staged = Path(tmp) / "site"
        put = subprocess.run([*pip, "install", "-q", "--no-index", "--no-deps", "--target", str(staged),
                              *map(str, Path(tmp).glob("*.whl"))], capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        assert put.returncode == 0, put.stderr[-2000:]
        (staged / ".complete").touch()
        shutil.rmtree(site, ignore_errors=True)  # an incomplete earlier attempt
        staged.rename(site)  # whole or not at all: a killed download leaves no half-installed cache
    return site


def package_dir(dist: str, version: str, package: str | None = None) -> Path:
    """The source folder of ``package`` (default ``dist``) at ``version``, without importing it: the installed
    one when that is the version, else the cached wheel's."""
    package = package or dist
    spec = importlib.util.find_spec(package)
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if spec is not None and installed == version:
        return Path(spec.submodule_search_locations[0])
    return wheel_site(dist, version) / package
