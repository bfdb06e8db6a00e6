#!/usr/bin/env bash
# The test command (README): unit tests, then the slow end-to-end smoke runs; --fast: unit tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-dmvae}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
if [ "${1:-}" = "--fast" ]; then  # unit tests only (minutes): the end-to-end runs carry the `slow` marker
  shift
  exec python -m pytest -q --timeout=600 --durations=10 -m "not slow" tests "$@"
fi
python -m pytest -q --timeout=1200 --durations=15 tests "$@"
