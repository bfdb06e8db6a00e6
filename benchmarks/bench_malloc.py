"""Two host-side costs of the Lite0 passes of the mini preset, each against its "before": `run.keep_freed_memory`
(glibc's mallopt, `trainers.common.keep_freed_memory`) against the default allocator (variants `glibc` vs
`kept`), and the symmetric TF-"SAME" pads inlined into the convs (`backbones.inline_symmetric_padding`)
against the package's separate zero-padded copies (`kept` vs `kept-padcopy`). The passes: the frozen-feature cache, reference and latent cache
(`infer`: BatchNorm folded, channels_last, no grad) and the DMD / refinement encoder (`train`: forward and
backward). Each (variant, pass) runs in its own process (mallopt cannot be undone in one), alternated
`--repeats` times so that load on the machine falls on both; one intra-op thread each. Prints per-batch time,
the process's user / system CPU and minor page faults over the timed batches, and its peak RSS.

    python -m benchmarks.bench_malloc --batches 10 --repeats 2          # both passes, batch 64 at 32 px -> 128 px
    python -m benchmarks.bench_malloc --variants kept,kept-padcopy --repeats 3
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import torch


def child(variant: str, mode: str, batches: int, batch: int) -> str:
    torch.set_num_threads(1)
    if variant.startswith("kept"):
        from trainers.common import keep_freed_memory
        assert keep_freed_memory(), "glibc's mallopt refused the settings"
    from dmvae_study.backbones import build_grid_backbone
    net, encode = build_grid_backbone("efficientnet_lite0", (8, 8), layer="block10")  # mini: 8x8 grid, 128 px
    if variant.endswith("padcopy"):                     # undo the inlining: the package's own padded copies
        for m in net.modules():
            if hasattr(m, "static_padding") and tuple(m.padding) != (0, 0):
                top, left = m.padding
                m.static_padding, m.padding = torch.nn.ZeroPad2d((left, left, top, top)), (0, 0)
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
    return (f"| {variant} | {mode} | {1000 * dt:.0f} | {r1.ru_utime - r0.ru_utime:.1f} | "
            f"{r1.ru_stime - r0.ru_stime:.1f} | {r1.ru_minflt - r0.ru_minflt:,} | {r1.ru_maxrss // 1024:,} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--variants", default="glibc,kept", help="of glibc, kept, kept-padcopy")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(child(a.child[0], a.child[1], a.batches, a.batch))
        return
    print("| variant | pass | ms / batch | user s | system s | minor faults | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        for _ in range(a.repeats):
            for variant in a.variants.split(","):
                out = subprocess.run([sys.executable, "-m", "benchmarks.bench_malloc", "--child", variant, mode,
                                      "--batches", str(a.batches), "--batch", str(a.batch)],
                                     capture_output=True, text=True, check=True)
                print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
