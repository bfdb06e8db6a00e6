"""What every stage shares: the one stage preamble (`run_stage`), the per-process context (device,
DDP, precision, threads), deterministic global batches, optimisers from config, checkpoint / resume,
progress lines and metric reporting, the non-finite guard, fault injection and EMA.

A stage is `run(ctx, art) -> summary`, one top-to-bottom function that runs on one process with no
Ray; under Ray Train the same function runs on every worker, with torch.distributed set up by Ray.
Randomness that touches the data (batch order, t, eps) is drawn for the *global* batch from a
generator seeded by (seed, stage, step) and sliced per rank, so N workers at batch b equal one
worker at batch N*b, and a resumed run replays exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dmvae_study.config import ExperimentConfig
from dmvae_study.loaders import GlobalBatches, hash_seed, step_loader
from dmvae_study.pipeline import STAGES, LaunchOptions, amp_precision, artifact, artifact_key, resolve
from dmvae_study.store import ArtifactDir, atomic_write_text
from trainers.checkpoint import checkpoint_state, last_flushed, restore_state, resume, save  # noqa: F401 (the stages' API)
from trainers.ema import EMA, unwrap  # noqa: F401 (the stages' API)

log = logging.getLogger("dmvae_study")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def run_stage(name: str, cfg: ExperimentConfig, opts: LaunchOptions | None = None) -> dict[str, Any]:
    """The one stage preamble: reuse a finished artifact, else set up the context, record the artifact's
    key next to it, and run the stage body `run(ctx, art)` of the stage's module. The config is resolved
    first (idempotent), so a stage never sees an underived value."""
    cfg = resolve(cfg)
    art = artifact(cfg, name)
    if art.done:
        return art.summary()
    ctx = StageContext.create(cfg, name, opts)
    if ctx.is_main:
        art.write_config(artifact_key(cfg, name))
    out = STAGES[name].body()(ctx, art)
    if ctx.is_main and art.done:  # where it ran, beside what it made: CPU training is not bit-reproducible across hosts
        summary = art.summary()
        if "host" not in summary:
            summary["host"] = host_facts(ctx.device, ctx.world)
            art.mark_done(summary)
        out = {**(out or {}), "host": summary["host"]}
    return out


def host_facts(device: torch.device, world: int = 1) -> str:
    """`<CPU or GPU model> · torch <version> · <n> thread(s) [· <world> workers]`: what a stage's numbers depend on
    beyond its config (float round-off differs between CPU kernels, thread counts and GPUs)."""
    if device.type == "cuda":
        chip = torch.cuda.get_device_name(device)
    else:
        chip = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")),
                    "") or os.uname().machine
    text = f"{chip} · torch {torch.__version__} · {torch.get_num_threads()} thread(s)"
    return text + (f" · {world} workers" if world > 1 else "")


@functools.cache
def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@dataclass
class StageContext:
    """Per-process facts and helpers of one stage run."""

    cfg: ExperimentConfig
    stage: str
    opts: LaunchOptions = field(default_factory=LaunchOptions)
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    resumed_from: int = 0  # checkpoint step this attempt resumed from (0: fresh); shows restarts in metrics
    _t0: float = field(default_factory=time.time)
    _log_buffer: dict[str, list[float]] = field(default_factory=dict)
    _batches: GlobalBatches | None = None
    _last_flush: tuple[float, int] | None = None

    # ---- set-up ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: ExperimentConfig, stage: str, opts: LaunchOptions | None = None) -> "StageContext":
        opts = opts or LaunchOptions()
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available() and (cfg.run.use_gpu or not opts.ray):
            device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed-shape conv stages (decoder, PatchGAN, LPIPS)
        else:
            device = torch.device("cpu")
            torch.set_num_threads(worker_threads(cfg))
        if cfg.run.keep_freed_memory:
            keep_freed_memory()
        torch.manual_seed(cfg.run.seed + 1000 * rank)
        return cls(cfg=cfg, stage=stage, opts=opts, rank=rank, world=world, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast where the artifact key says bf16 (`pipeline.amp_precision`), on whatever device."""
        if amp_precision(self.cfg) == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP when several workers; a 1-worker run keeps the bare module (no `.module`)."""
        module.to(self.device)
        if self.world > 1 and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids, find_unused_parameters=False,
                                                       gradient_as_bucket_view=True)
        return module

    def channels_last(self, *modules: nn.Module) -> None:
        """Conv nets (decoder, PatchGAN) in channels_last on GPU: cuDNN's fast NHWC kernels under bf16."""
        if self.device.type == "cuda":
            for m in modules:
                m.to(memory_format=torch.channels_last)

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.world} workers; "
                             f"set the stage's batch_size to a multiple of run.num_workers")
        return global_batch // self.world

    # ---- deterministic randomness and data ---------------------------------------------------------
    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """CPU generator seeded by (seed, stage, step, salt): identical on every rank."""
        g = torch.Generator()
        g.manual_seed(hash_seed(self.cfg.run.seed, self.stage, step, salt))
        return g

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor."""
        b = x.shape[0] // self.world
        return x[self.rank * b:(self.rank + 1) * b].to(self.device, non_blocking=True)

    def global_batches(self, n: int, global_batch: int) -> GlobalBatches:
        if self._batches is None or (self._batches.n, self._batches.gb) != (n, global_batch):
            self._batches = GlobalBatches(n, global_batch, seed=self.cfg.run.seed, stage=self.stage,
                                          rank=self.rank, world=self.world)
        return self._batches

    def batch_indices(self, n: int, global_batch: int, step: int) -> torch.Tensor:
        """Dataset indices of this rank's share of the global batch at `step` (epoch-wise permutations)."""
        return self.global_batches(n, global_batch).indices(step)

    def image_batches(self, dataset, global_batch: int, start: int, total: int) -> Iterator:
        """`(img (b, 3, H, W), y (b,), ...)` on the device for each step from `start` (the one loading path:
        `dmvae_study.loaders`, flips redrawn every epoch), with the config's loader workers."""
        loader = step_loader(dataset, self.global_batches(len(dataset), global_batch), start, total,
                             num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        for batch in loader:
            yield tuple(t.to(self.device, non_blocking=True) for t in batch)

    # ---- reporting --------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float | torch.Tensor]) -> None:
        """Buffer metrics (device tensors allowed: no sync here); flushed every `run.log_every`."""
        for k, v in metrics.items():
            self._log_buffer.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else float(v))

    def flush(self, step: int, art: ArtifactDir, images_per_step: int, total: int | None = None,
              extra: dict | None = None) -> dict:
        """Reduce buffered metrics over steps and ranks; write JSONL, print one progress line (main rank)
        and report to Ray Train / Tune (every rank: Ray Train's report is collective)."""
        out: dict[str, float] = {}
        for k, vals in self._log_buffer.items():
            t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                             for v in vals]).mean()
            if self.world > 1:
                dist.all_reduce(t)
                t = t / self.world
            out[k] = float(t)
        self._log_buffer.clear()
        now = time.time()
        prev_t, prev_step = self._last_flush or (self._t0, self.resumed_from)
        rate = (step - prev_step) * images_per_step / max(now - prev_t, 1e-9)
        self._last_flush = (now, step)
        out.update({"step": step, "kimg": step * images_per_step / 1000.0, "time/wall_s": now - self._t0,
                    "perf/img_per_s": rate, "nonfinite/total": self.nonfinite_total,
                    "resumed_from": self.resumed_from})
        out.update(extra or {})
        if self.is_main:
            with open(art.file("metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"stage": self.stage, **out}) + "\n")
            mean_rate = (step - self.resumed_from) * images_per_step / max(now - self._t0, 1e-9)
            log.info(progress_line(self.opts.row or self.cfg.prior.name, self.stage, step, total, out, rate,
                                   images_per_step, mean_rate))
        report_interval(self.opts, {f"{self.stage}/{k}": v for k, v in out.items()
                                    if isinstance(v, (int, float)) and v == v})
        return out

    # ---- robustness -------------------------------------------------------------------------------
    def finite_or_skip(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank; else count it, and stop after too many in a row."""
        ok = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            self.nonfinite_run = 0
            return True
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        log.warning("[%s] non-finite loss: update skipped (%d in a row, %d total)",
                    self.stage, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.cfg.run.max_nonfinite:
            raise NonFiniteLossError(
                f"stage {self.stage}: {self.nonfinite_run} consecutive non-finite losses; stopping and keeping "
                f"the last good checkpoint. Lower the learning rate or check the inputs "
                f"(run.max_nonfinite={self.cfg.run.max_nonfinite}).")
        return False

    def maybe_inject_fault(self, step: int, art: ArtifactDir) -> None:
        """Fault injection for tests: worker `world-1` dies at `run.fail_at_step`, first attempt only."""
        at = self.cfg.run.fail_at_step
        if at is None or step != at or self.rank != self.world - 1:
            return
        marker = art.file(f".fault-injected-{self.stage}")
        if marker.exists():
            return
        atomic_write_text(marker, "1")
        log.warning("[%s] fault injection: rank %d exits at step %d", self.stage, self.rank, step)
        os._exit(17)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>
MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 30, (1 << 31) - 1
# The same settings for a process yet to start (glibc reads them at startup; Ray workers get them through the
# job's runtime_env, `studies.trials.init_ray`). One arena: a thread's allocations come from the main heap
# too. Ray runs a trial's stages in a thread of its worker (Tune's RunnerThread), and a thread's own arena
# is a set of 64 MiB heaps that cannot hold Lite0's larger activations: those are mmapped whatever the
# threshold. glibc picks a thread's arena at its first allocation, so this cannot be set later from inside.
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD),
              "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


@functools.cache
def keep_freed_memory() -> bool:
    """Make this process's glibc malloc keep what it frees: allocations up to 1 GiB come from its heap (not
    `mmap`), and freed memory is not returned to the kernel (`mallopt` M_MMAP_THRESHOLD, M_TRIM_THRESHOLD).
    By default every tensor above the dynamic mmap threshold (at most 32 MiB) is a fresh mapping, zero-filled
    page by page by the kernel on first touch and unmapped on free, once per step: in the Lite0 stages of the
    mini preset (activations of 64 x 128 px images) that was 60% of the process's CPU time in the kernel
    (~400k page faults/s), and keeping the memory halves the step time (BENCHMARKS.md, "Page faults").
    Nothing computed changes. The same as the `MALLOC_*` environment of a new process (`MALLOC_ENV`), but
    set at run time. That covers allocations of the main thread (the driver's shared stages, a stage run
    without Ray) and of threads started later; a thread that already had its own arena keeps mmapping its
    large tensors, which is why Ray workers also start with `MALLOC_ENV` (one arena). Returns whether glibc
    accepted the settings (False on other C libraries: nothing is changed there). Idempotent."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(bool(mallopt(opt, v)) for opt, v in
               ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_ARENA_MAX, 1)))


def worker_threads(cfg: ExperimentConfig) -> int:
    """Intra-op threads of a CPU worker: `run.threads`, else the CPUs it reserves (at least one)."""
    return cfg.run.threads or max(1, round(cfg.run.cpus_per_worker))


def progress_line(row: str, stage: str, step: int, total: int | None, m: dict, rate: float, ipb: int,
                  mean_rate: float | None = None) -> str:
    """`[row] dmd 300/1000 loss/dm 0.155 loss/fake 0.883 | 212 img/s, ETA 3m20s` (rank 0, each interval).
    `rate`: this interval's img/s; the ETA uses `mean_rate`, the stage's mean since it (re)started, so an
    interval that also ran a gFID evaluation does not make it jump (every later interval has its share)."""
    losses = " ".join(f"{k} {v:.4g}" for k, v in m.items()
                      if k.startswith(("loss/", "match/", "eval/")) and isinstance(v, float))
    eta = ""
    eta_rate = mean_rate if mean_rate is not None else rate
    if total and eta_rate > 0:
        left = (total - step) * ipb / eta_rate
        eta = f", ETA {int(left // 60)}m{int(left % 60):02d}s"
    return f"[{row}] {stage} {step}/{total or '?'} {losses} | {rate:.0f} img/s{eta}"


def report_interval(opts: LaunchOptions, metrics: dict[str, float]) -> None:
    """Per-interval metrics into Ray's result stream: Ray Train (inside a worker group) or Tune (a trial
    that runs its stages in-process), so Tune's loggers and TensorBoard see every stage as it trains."""
    if opts.report == "train":
        import ray.train
        ray.train.report(metrics)
    elif opts.report == "tune":
        from ray import tune
        tune.report(metrics)


def progress(ctx: StageContext, start: int, total: int) -> Iterator[int]:
    """Step iterator; a tqdm bar on the main rank of an interactive, non-Ray run (Ray runs print one
    progress line per log interval instead, which reach the driver and `ray job logs`)."""
    quiet = (os.environ.get("DMVAE_NO_PROGRESS") == "1" or ctx.opts.ray or ctx.opts.report != "none"
             or not sys.stderr.isatty())
    ctx._last_flush = (time.time(), start)  # img/s of the first interval counts from here, not from set-up
    if not ctx.is_main or total - start <= 0 or quiet:
        yield from range(start, total)
        return
    from tqdm.auto import tqdm
    yield from tqdm(range(start, total), initial=start, total=total, desc=ctx.stage, leave=False, mininterval=2.0)


class Optim:
    """AdamW built from a config section (`lr`, `betas`, `weight_decay`, `grad_clip`, `warmup_steps`),
    with its linear warmup as the official `lr_lambda`: factor `n / warmup` for update n < warmup, then 1
    (the official DMD scheduler; the first update therefore has lr 0), and its gradient-norm clip."""

    def __init__(self, params, sec: Any, device: torch.device, *, lr: float | None = None,
                 weight_decay: float | None = None, grad_clip: float | None = None):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=sec.lr if lr is None else lr, betas=tuple(sec.betas),
                                     weight_decay=sec.weight_decay if weight_decay is None else weight_decay,
                                     fused=device.type == "cuda")
        warm = int(sec.warmup_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda n: n / warm if n < warm else 1.0)
        self.clip = float(sec.grad_clip if grad_clip is None else grad_clip)

    def step(self, loss: torch.Tensor) -> torch.Tensor | None:
        """zero_grad, backward, clip (when on), step, advance the warmup. Returns the pre-clip grad norm."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.params, self.clip) if self.clip > 0 else None
        self.opt.step()
        self.sched.step()
        return gn

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])


def apply_update(ctx: StageContext, step: int, loss: torch.Tensor, opt: Optim, stats: dict[str, Any]) -> bool:
    """The guarded optimiser step every loop shares: skip (and count) a non-finite loss, else
    backward, clip, step and log `stats`. Returns whether the update was applied."""
    if not ctx.finite_or_skip(loss):
        return False
    gn = opt.step(loss)
    ctx.log(step, stats if gn is None else {**stats, f"grad_norm/{ctx.stage}": gn})
    return True


def loop_tail(ctx: StageContext, art: ArtifactDir, step: int, total: int, images_per_step: int,
              state: dict[str, Any], extra: Any = None) -> dict | None:
    """End of a loop iteration: flush metrics every `run.log_every` (and at the end), checkpoint every
    `run.checkpoint_every` (and at the end). `extra()` adds metrics to a flush. Returns the flushed metrics."""
    run, done = ctx.cfg.run, step + 1
    out = None
    if done % run.log_every == 0 or done == total:
        out = ctx.flush(done, art, images_per_step, total, extra=extra() if callable(extra) else extra)
    if done % run.checkpoint_every == 0 or done == total:
        save(ctx, art, done, state)
    return out

