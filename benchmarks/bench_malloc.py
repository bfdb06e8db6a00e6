"""`run.keep_freed_memory` (glibc's mallopt, `trainers.common.keep_freed_memory`) against the default
allocator, on the Lite0 passes of the mini preset: the frozen-feature cache, reference and latent cache
(`infer`: BatchNorm folded, channels_last, no grad) and the DMD / refinement encoder (`train`: forward and
backward). Each (allocator, pass) runs in its own process (mallopt cannot be undone in one), alternated
`--repeats` times so that load on the machine falls on both; one intra-op thread each. Prints per-batch time,
the process's user / system CPU and minor page faults over the timed batches, and its peak RSS.

    python -m benchmarks.bench_malloc --batches 10 --repeats 2          # both passes, batch 64 at 32 px -> 128 px
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def child(keep: bool, mode: str, batches: int, batch: int) -> str:
    torch.set_num_threads(1)
    if keep:
        from trainers.common import keep_freed_memory
        assert keep_freed_memory(), "glibc's mallopt refused the settings"
    from dmvae_study.backbones import build_grid_backbone
    net, encode = build_grid_backbone("efficientnet_lite0", (8, 8), layer="block10")  # mini: 8x8 grid, 128 px
    if mode == "infer":
        net.fuse_bn_()
        net.to(memory_format=torch.channels_last)
    else:
        net.train().requires_grad_(True)
    x = torch.randn(batch, 3, 32, 32)

    def step() -> None:
        if mode == "infer":
            with torch.no_grad():
                encode(x)
        else:
            encode(x).square().mean().backward()

    for _ in range(2):
        step()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(batches):
        step()
    dt, r1 = (time.perf_counter() - t0) / batches, resource.getrusage(resource.RUSAGE_SELF)
    return (f"| {'kept' if keep else 'glibc default'} | {mode} | {1000 * dt:.0f} | {r1.ru_utime - r0.ru_utime:.1f} | "
            f"{r1.ru_stime - r0.ru_stime:.1f} | {r1.ru_minflt - r0.ru_minflt:,} | {r1.ru_maxrss // 1024:,} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("ALLOCATOR", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(child(a.child[0] == "kept", a.child[1], a.batches, a.batch))
        return
    print("| allocator | pass | ms / batch | user s | system s | minor faults | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        for _ in range(a.repeats):
            for alloc in ("default", "kept"):
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_malloc", "--child", alloc, mode,
                                      "--batches", str(a.batches), "--batch", str(a.batch)],
                                     capture_output=True, text=True, check=True)
                print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
