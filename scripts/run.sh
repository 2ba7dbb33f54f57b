#!/usr/bin/env bash
# Install what is needed, then run the main job end to end on the bundled default model.
# Extra arguments go to `sparsellm run` (see `sparsellm run --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/sparsellm run "$@"
