"""Data-parallel scaling of a compute-bound stage: the DiT flow-matching step of the teacher / stage-2
loop on N Ray Train workers (TorchTrainer, DDP over gloo on CPU or NCCL on GPUs) vs one worker.

Each worker runs `worker_loop`: the trainer's own per-process machinery (`StageContext.create`, which
reads the process group Ray Train set up, `ctx.wrap` -> DDP, `ctx.batch_indices` / `ctx.slice` for the
rank's share of the global batch, `ctx.finite_or_skip` with its all-reduce, `Optim`) around the
`fit_flow_model` step, timed between barriers after warm-up. Weak scaling by default: every worker
keeps `--batch-per-worker`, so N workers process N times the images per step; `--strong` keeps the
global batch fixed instead.

Baselines (one worker at `--batch-per-worker`, or the global batch with `--strong`):

- `interleaved` (default): inside the same Ray worker group, rank 0 alone trains a plain (non-DDP)
  copy while the other ranks wait in a barrier, once with 1 thread and once with all cores, in rounds
  alternating with the N-worker phase. Same processes, same priority, same background load (a
  shared machine's load drifts by 2x within a minute; unpaired runs are not comparable).
- `inproc`: one worker in this process (what `run_pipeline` does for `run.num_workers=1`).
- `ray`: a separate 1-worker TorchTrainer.

Ray starts its workers at nice 15 (raylet `worker_niceness`): on a shared machine they yield to every
normal process; `--ray-niceness 0` puts them level with this process. Ray start-up and worker-group
creation are not in the figure (the platform pays them once per study row).

    python -m benchmarks.bench_scaling --size Mini --latent 32x8x8 --batch-per-worker 16 --steps 3    # 2 CPU cores
    python -m benchmarks.bench_scaling --use-gpu --workers 8 --size XL --batch-per-worker 256 --steps 20 \
        --baseline-threads 16
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import torch

from benchmarks.bench_dit import build_net, dit_flops, parse_latent
from benchmarks.common import Result, base_parser, matmul_peak, report, setup, split_list


def _make_step(ctx, net_w: torch.nn.Module, net: torch.nn.Module, gb: int, latent: tuple[int, int, int],
               num_classes: int) -> Callable[[int], None]:
    """`step(i)`: one iteration of `trainers.flowfit.fit_flow_model` for `ctx`'s share of a global batch
    (its indexing, then the stage's own `trainers.flowfit.step`)."""
    from dmvae_study.config import TeacherConfig
    from dmvae_study.objectives.flow import FlowMatchingLoss
    from trainers import flowfit
    from trainers.common import EMA, Optim
    dcfg = TeacherConfig(batch_size=gb, time_sampling="logit_normal")
    state = flowfit.FlowState(ctx, dcfg, net, net_w, EMA(net, 0.9999), Optim(net.parameters(), dcfg, ctx.device),
                              FlowMatchingLoss(time_sampling="logit_normal"), tuple(latent))
    pool = torch.randn(max(4 * gb, 64), *latent)
    labels = torch.randint(0, num_classes, (pool.shape[0],))

    def step(i: int) -> None:
        idx = ctx.batch_indices(pool.shape[0], gb, i)
        flowfit.step(state, i, pool[idx].to(ctx.device, non_blocking=True), labels[idx].to(ctx.device))
    return step


def _timed(step: Callable[[int], None], start: int, steps: int, device: torch.device,
           barrier: Callable[[], None]) -> float:
    """Seconds per step of `steps` steps, between barriers (the slowest rank sets the time)."""
    barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(start + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    barrier()
    return (time.perf_counter() - t0) / steps


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One worker's timed DiT training (Ray Train `train_loop_per_worker`, or called in-process).

    Returns `step_s` (median over rounds of the group's step time) and, with `solo_threads`, `solo`:
    {threads: median step time of rank 0 training alone at `solo_batch`}."""
    from dmvae_study.presets import preset
    from trainers.common import StageContext
    threads = int(config["threads"])
    torch.set_num_threads(threads)
    cfg = preset("smoke", {"run.seed": config["seed"], "run.use_gpu": bool(config["use_gpu"]),
                           "run.precision": config["precision"]})
    ctx = StageContext.create(cfg, "teacher", {"ray": bool(config["ray"])})
    latent, gb, size, nc = tuple(config["latent"]), int(config["global_batch"]), config["size"], int(config["num_classes"])
    ctx.local_batch(gb)
    net = build_net(size, latent, nc)
    step = _make_step(ctx, ctx.wrap(net), net, gb, latent, nc)
    solo_threads = [int(k) for k in config.get("solo_threads") or []]
    solo_step = None
    if solo_threads and ctx.is_main:  # a world-1 context on rank 0: no slicing, no all-reduce
        solo_ctx = StageContext(cfg=cfg, stage="teacher", device=ctx.device)
        solo_net = build_net(size, latent, nc).to(ctx.device)
        solo_step = _make_step(solo_ctx, solo_net, solo_net, int(config["solo_batch"]), latent, nc)
    warmup, steps, rounds = int(config["warmup"]), int(config["steps"]), int(config.get("rounds", 1))
    for i in range(warmup):
        step(i)
        if solo_step is not None:
            solo_step(i)
    group_s: list[float] = []
    solo_s: dict[int, list[float]] = {k: [] for k in solo_threads}
    pos = warmup
    for _ in range(rounds):
        group_s.append(_timed(step, pos, steps, ctx.device, ctx.barrier))
        for k in solo_threads:  # the other ranks wait in the barrier meanwhile
            if solo_step is not None:
                torch.set_num_threads(k)
                solo_s[k].append(_timed(solo_step, pos, steps, ctx.device, lambda: None))
                torch.set_num_threads(threads)
            ctx.barrier()
        pos += steps
    out = {"step_s": statistics.median(group_s), "rounds_s": group_s, "world": ctx.world, "threads": threads,
           "device": ctx.device.type, "niceness": os.nice(0),
           "solo": {str(k): statistics.median(v) for k, v in solo_s.items() if v},
           "solo_rounds_s": {str(k): v for k, v in solo_s.items() if v}}
    if config["ray"]:
        _report(out, ctx.is_main)
    return out


def _report(metrics: dict[str, Any], is_main: bool) -> None:
    """Ray Train V2 keeps only metrics that come with a checkpoint (`Result.metrics`): rank 0 attaches a
    tiny one; every rank must call `report`."""
    import ray.train
    if not is_main:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "metrics.json"), "w") as fh:
            json.dump(metrics, fh)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_ray(config: dict[str, Any], workers: int, cpus_per_worker: float, use_gpu: bool,
            niceness: int | None = None) -> dict[str, Any]:
    """`worker_loop` on a `workers`-worker TorchTrainer; returns rank 0's result."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    if not ray.is_initialized():
        if niceness is not None:  # raylet config, read when this process starts the local cluster
            os.environ["RAY_worker_niceness"] = str(niceness)
        ray.init(include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp"))
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-", ignore_cleanup_errors=True) as storage:
        trainer = TorchTrainer(worker_loop, train_loop_config={**config, "ray": True},
                               torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                            resources_per_worker=resources),
                               run_config=RunConfig(name=f"bench-scaling-{workers}w", storage_path=storage))
        return dict(trainer.fit().metrics)


def measure(*, size: str, latent: tuple[int, int, int], num_classes: int, workers: int, batch_per_worker: int,
            strong: bool, threads_per_worker: int, baseline: str, baseline_threads: Sequence[int],
            cpus_per_worker: float, use_gpu: bool, precision: str, seed: int, steps: int, warmup: int, rounds: int,
            peak: float | None, niceness: int | None = None) -> list[Result]:
    """Rows: one per 1-worker baseline (each thread count), then the N-worker run with its speed-up over
    every baseline (`speedup_vs_1w_<k>thr`)."""
    base = {"size": size, "latent": list(latent), "num_classes": num_classes, "seed": seed, "steps": steps,
            "warmup": warmup, "precision": precision, "use_gpu": use_gpu, "rounds": rounds}
    gb_multi = batch_per_worker * workers
    gb_one = gb_multi if strong else batch_per_worker
    dev = "cuda" if use_gpu else "cpu"
    lat = "x".join(map(str, latent))
    solo: dict[int, float] = {}
    multi_conf = {**base, "global_batch": gb_multi, "threads": threads_per_worker}
    if baseline == "interleaved":
        multi_conf.update(solo_threads=list(baseline_threads), solo_batch=gb_one)
    else:
        for k in baseline_threads:
            conf = {**base, "global_batch": gb_one, "threads": k, "rounds": 1}
            r = worker_loop({**conf, "ray": False}) if baseline == "inproc" else \
                run_ray(conf, 1, cpus_per_worker, use_gpu, niceness)
            solo[k] = r["step_s"]
    multi = run_ray(multi_conf, workers, cpus_per_worker, use_gpu, niceness)
    if baseline == "interleaved":
        solo = {int(k): v for k, v in multi["solo"].items()}
    where = {"interleaved": "rank 0 alone", "inproc": "in-process", "ray": "1-worker Ray"}[baseline]
    rows = [Result("scaling", f"{size}/1 {lat} 1 worker ({where}, {k} thr)", dev, gb_one, s, gb_one,
                   dit_flops(size, gb_one, latent, num_classes), peak, None, {"threads": k})
            for k, s in sorted(solo.items())]
    row = Result("scaling", f"{size}/1 {lat} {workers} Ray workers ({threads_per_worker} thr each)", dev, gb_multi,
                 multi["step_s"], gb_multi, dit_flops(size, gb_multi, latent, num_classes), peak, None,
                 {"mode": "strong" if strong else "weak", "worker_niceness": multi.get("niceness"),
                  "rounds_ms": [round(s * 1e3, 1) for s in multi.get("rounds_s", [])]})
    for b in rows:
        row.extra[f"speedup_vs_1w_{b.extra['threads']}thr"] = round(row.images_per_s / b.images_per_s, 3)
    # interleaved: the speed-up within each round (same background load), the least noisy figure
    group_rounds = multi.get("rounds_s", [])
    for k, solo_rounds in (multi.get("solo_rounds_s") or {}).items():
        row.extra[f"round_speedups_vs_1w_{k}thr"] = [round((gb_multi / g) / (gb_one / s1), 3)
                                                     for g, s1 in zip(group_rounds, solo_rounds)]
    return [*rows, row]


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0], compile_flag=False)
    p.add_argument("--size", default="Mini")
    p.add_argument("--latent", default="32x8x8", help="CxHxW (paper: 32x16x16; smaller keeps CPU runs short)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-per-worker", type=int, default=16)
    p.add_argument("--strong", action="store_true", help="fixed global batch (workers x batch-per-worker)")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default: cores / workers")
    p.add_argument("--baseline", default="interleaved", choices=["interleaved", "inproc", "ray"])
    p.add_argument("--baseline-threads", default=None,
                   help="comma list of thread counts for the 1-worker baselines (default: 1 and all cores)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians are reported)")
    p.add_argument("--cpus-per-worker", type=float, default=0.9, help="Ray CPU reservation per worker")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--ray-niceness", type=int, default=None,
                   help="RAY_worker_niceness for a Ray started here (Ray's default 15); 0 = level with this process")
    args = p.parse_args(argv)
    setup(args)
    cores = os.cpu_count() or 1
    device = torch.device("cuda" if args.use_gpu else "cpu")
    peak = matmul_peak(device, args.peak_n)
    threads = [int(k) for k in split_list(args.baseline_threads)] if args.baseline_threads else sorted({1, cores})
    rows = measure(size=args.size, latent=parse_latent(args.latent), num_classes=args.num_classes,
                   workers=args.workers, batch_per_worker=args.batch_per_worker, strong=args.strong,
                   threads_per_worker=args.threads_per_worker or max(cores // args.workers, 1),
                   baseline=args.baseline, baseline_threads=threads, cpus_per_worker=args.cpus_per_worker,
                   use_gpu=args.use_gpu, precision=args.precision, seed=args.seed, steps=args.steps,
                   warmup=args.warmup, rounds=args.rounds, peak=peak, niceness=args.ray_niceness)
    return report(rows, device=device, peak_tflops=peak, json_path=args.json,
                  argv=argv if argv is not None else sys.argv[1:],
                  notes={"target": ">= 1.6x images/s with 2 workers on 2 CPU cores (weak scaling)"})


if __name__ == "__main__":
    main()
