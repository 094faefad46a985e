#!/usr/bin/env bash
# Download, where there is a network, the wheels scripts/gpu_check.sh installs on a GPU machine that has none:
# TRL and datasets and the packages they need beyond torch/transformers/accelerate, at the versions installed in
# this checkout's venv, for the GPU machine's Python. They go to .whl/ (git-ignored): .whl/arrow holds pyarrow
# alone (55 MB for cp311), .whl/rest the others (15 MB), because the device tool carries at most 64 MiB per call:
# carry .whl/arrow on one call and .whl/rest on the next when the machine lacks pyarrow (docs/gpu.md).
#   scripts/fetch_gpu_wheels.sh [PYTHON_VERSION]      # default: this venv's, e.g. 3.11
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VER=${1:-$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
pin() { $PY -c "import importlib.metadata as md, sys; print(' '.join(f'{n}=={md.version(n)}' for n in sys.argv[1:]))" "$@"; }
get() {
    local dest=$1; shift
    mkdir -p "$dest"
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$VER" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "$@"
}
get .whl/rest $(pin trl datasets dill multiprocess xxhash fsspec pandas)
get .whl/arrow $(pin pyarrow)
du -sh .whl/rest .whl/arrow
