#!/usr/bin/env bash
# Download the wheels the GPU suite needs on the GPU image into a git-ignored folder (default .whl/), and
# build rlhf_fast's own wheel from this working tree (the code that will be measured).
#
#     bash benchmarks/fetch_gpu_wheels.sh [DIR]
#
# The GPU image is CPython 3.12 on manylinux x86_64 with no internet; there, install with
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site DIR/*.whl
#     export PYTHONPATH=/tmp/site
# (see benchmarks/README.md). The pinned list is benchmarks/gpu_wheels.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"
mkdir -p "$dest"
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -r benchmarks/gpu_wheels.txt -d "$dest"
rm -f "$dest"/rlhf_fast-*.whl  # one version of each: two stop the install
python -m pip wheel --quiet --no-deps -w "$dest" .
ls -l "$dest"
total=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $dest (the GPU run may carry 64 MiB in all)"
if [ "$total" -gt $((60 * 1024 * 1024)) ]; then
    echo "error: the wheels exceed 60 MiB: the working tree must also fit in 64 MiB" >&2
    exit 1
fi
