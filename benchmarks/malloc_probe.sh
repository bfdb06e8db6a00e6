#!/usr/bin/env bash
# Run one command under a given allocator and print the child's CPU split and page faults, plus the benchmark
# table rows it printed (BENCHMARKS.md, "Page faults in the Lite0 stages").
#   bash benchmarks/malloc_probe.sh LABEL PRELOAD -- COMMAND...     (PRELOAD: a .so path, or "none")
#   e.g. bash benchmarks/malloc_probe.sh tcmalloc /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 -- \
#          .venv/bin/python -m benchmarks.bench_dmd --preset mini --batch 64 --threads 1 --no-dit --no-count --peak-n 0
set -euo pipefail
[ $# -ge 4 ] && [ "$3" = "--" ] || { echo "usage: $0 LABEL PRELOAD -- COMMAND..." >&2; exit 2; }
label=$1; pre=$2; shift 3
[ "$pre" = none ] || [ -f "$pre" ] || { echo "$0: no such library: $pre (apt-get install libtcmalloc-minimal4 or libjemalloc2)" >&2; exit 2; }
exec python3 - "$label" "$pre" "$@" <<'PY'
import os, resource, subprocess, sys, time
label, pre, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
env = dict(os.environ)
if pre != "none":
    env["LD_PRELOAD"] = pre
t0 = time.time()
out = subprocess.run(cmd, env=env, capture_output=True, text=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{label}: wall {time.time() - t0:.1f}s user {r.ru_utime:.1f}s sys {r.ru_stime:.1f}s minflt {r.ru_minflt}")
for line in out.stdout.splitlines():
    if line.startswith("| ") and not line.startswith(("| bench", "|--")):
        print("   ", line)
if out.returncode:
    print(out.stderr[-2000:], file=sys.stderr)
sys.exit(out.returncode)
PY
