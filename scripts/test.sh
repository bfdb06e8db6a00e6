#!/usr/bin/env bash
# The test command (README): unit tests and the slow end-to-end smoke runs on two pytest-xdist workers
# (tests/conftest.py: longest first, tests sharing a module fixture together); --fast: unit tests only.
# DMVAE_TEST_WORKERS=0 runs everything in this one process (serial; as before, slower).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
export RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray-dmvae}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
workers="${DMVAE_TEST_WORKERS:-2}"
par=()
[ "$workers" = 0 ] || par=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
if [ "${1:-}" = "--fast" ]; then  # unit tests only (minutes): the end-to-end runs carry the `slow` marker
  shift
  exec python -m pytest -q "${par[@]}" --timeout=600 --durations=10 -m "not slow" tests "$@"
fi
exec python -m pytest -q "${par[@]}" --timeout=1200 --durations=15 tests "$@"
