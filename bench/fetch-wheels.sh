#!/usr/bin/env bash
# Download the wheels bench/device-wheels.txt lists, for the GPU machine, into an ignored folder (default .whl/):
#   bash bench/fetch-wheels.sh [DIR] [PYTHON_VERSION]
# PYTHON_VERSION: the machine's python (3.12 on the workplace's H200 image; 3.11 for this CPU's dry run in CI).
# Binary-only, no dependencies resolved (--no-deps): the list names every package the machine lacks. Needs a
# package registry (here, not on the GPU machine). Then carry DIR with the run: `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYVER=${2:-3.12}
PY=${PYTHON:-.venv/bin/python}
mapfile -t specs < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' bench/device-wheels.txt | grep -v '^$')
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DIR" "${specs[@]}"
echo "fetch-wheels: ${#specs[@]} wheels for CPython $PYVER in $DIR ($(du -sh "$DIR" | cut -f1))"
