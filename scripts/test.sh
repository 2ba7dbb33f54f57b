#!/usr/bin/env bash
# Install what is needed, lint (ruff, import layers), then run the whole test suite (unit + a few real-model tests).
# Pass `-m "not real"` to skip the tests that use the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/lint-imports  # layered imports, no cycles (contracts in pyproject.toml)
exec .venv/bin/python -m pytest "$@"
