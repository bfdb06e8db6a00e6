#!/usr/bin/env bash
# The test command (README): unit tests, then the slow end-to-end smoke runs.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-dmvae}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
python -m pytest -q --timeout=1200 --durations=15 tests "$@"
