"""What every stage shares: the per-process context (device, DDP, precision), deterministic global
batches, checkpoint / resume, metric reporting, the non-finite guard, fault injection and EMA.

A stage is one top-to-bottom function `train_loop(config)` that runs on one process with no Ray;
under Ray Train the same function runs on every worker, with torch.distributed set up by Ray.
Randomness that touches the data (batch order, t, eps) is drawn for the *global* batch from a
generator seeded by (seed, stage, step) and sliced per rank, so N workers at batch b equal one
worker at batch N*b, and a resumed run replays exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from dmvae_study.config import ExperimentConfig
from dmvae_study.store import ArtifactDir, ArtifactStore, atomic_write_text

log = logging.getLogger("dmvae_study")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is kept."""


def as_experiment(config: ExperimentConfig | dict[str, Any]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Accept an ExperimentConfig or the launcher's dict `{"experiment": {...}, ...extras}`."""
    if isinstance(config, ExperimentConfig):
        return config, {}
    extras = {k: v for k, v in config.items() if k != "experiment"}
    return ExperimentConfig.from_dict(config["experiment"]), extras


def store_of(cfg: ExperimentConfig) -> ArtifactStore:
    root = cfg.run.store_dir or os.path.join(cfg.run.out_dir, cfg.run.name, "store")
    return ArtifactStore(root)


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    With `warmup` the decay of update n (0-based) is `min(decay, (1 + n) / (10 + n))`, the
    TensorFlow `num_updates` convention diffusers also uses: short runs are not dominated by the
    initial weights (plain decay 0.999 after 800 steps keeps 45% of them), and long runs are
    unchanged (the cap binds from n = 9/(1 - decay) - 1). `warmup=False` is the official code's
    plain EMA. `updates` is checkpointed with the shadow weights."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow = copy.deepcopy(unwrap(module)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One fused `_foreach_lerp_` over all floating tensors (a loop is ~400 small launches for XL)."""
        src = unwrap(module).state_dict()
        dst = self.shadow.state_dict()
        floats = [k for k, v in dst.items() if v.dtype.is_floating_point]
        decay = self.current_decay()
        self.updates += 1
        torch._foreach_lerp_([dst[k] for k in floats], [src[k].to(dst[k].dtype) for k in floats], 1.0 - decay)
        for k, v in dst.items():
            if not v.dtype.is_floating_point:
                v.copy_(src[k])


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


@dataclass
class StageContext:
    """Per-process facts and helpers of one stage run."""

    cfg: ExperimentConfig
    stage: str
    ray: bool = False
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    nonfinite_total: int = 0
    nonfinite_run: int = 0
    resumed_from: int = 0  # checkpoint step this attempt resumed from (0: fresh); shows restarts in metrics
    _t0: float = field(default_factory=time.time)
    _log_buffer: dict[str, list[float]] = field(default_factory=dict)
    _perm_key: tuple | None = None
    _perm: torch.Tensor | None = None

    # ---- set-up ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: ExperimentConfig, stage: str, extras: dict[str, Any] | None = None) -> "StageContext":
        extras = extras or {}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if torch.cuda.is_available() and (cfg.run.use_gpu or not extras.get("ray")):
            device = torch.device("cuda", torch.cuda.current_device())
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed-shape conv stages (decoder, PatchGAN, LPIPS)
        else:
            device = torch.device("cpu")
        torch.manual_seed(cfg.run.seed + 1000 * rank)
        return cls(cfg=cfg, stage=stage, ray=bool(extras.get("ray")), rank=rank, world=world, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.cfg.run.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
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

    # ---- deterministic randomness -----------------------------------------------------------------
    def generator(self, step: int, salt: int = 0) -> torch.Generator:
        """CPU generator seeded by (seed, stage, step, salt): identical on every rank."""
        g = torch.Generator()
        g.manual_seed(hash_seed(self.cfg.run.seed, self.stage, step, salt))
        return g

    def slice(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor."""
        b = x.shape[0] // self.world
        return x[self.rank * b:(self.rank + 1) * b].to(self.device, non_blocking=True)

    def batch_indices(self, n: int, global_batch: int, step: int) -> torch.Tensor:
        """Dataset indices of this rank's share of the global batch at `step` (epoch-wise permutations)."""
        per_epoch = max(n // global_batch, 1)
        epoch, pos = divmod(step, per_epoch)
        key = (n, global_batch, epoch)
        if self._perm_key != key:  # one shuffle per epoch, not per step (1.28M indices for ImageNet)
            g = torch.Generator()
            g.manual_seed(hash_seed(self.cfg.run.seed, self.stage, epoch, 7))
            perm = torch.randperm(n, generator=g)
            if n < global_batch:
                perm = perm.repeat(math.ceil(global_batch / n))
            self._perm_key, self._perm = key, perm
        perm = self._perm
        rows = perm[pos * global_batch:(pos + 1) * global_batch]
        b = global_batch // self.world
        return rows[self.rank * b:(self.rank + 1) * b]

    # ---- reporting --------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float | torch.Tensor]) -> None:
        """Buffer metrics (device tensors allowed: no sync here); flushed every `run.log_every`."""
        for k, v in metrics.items():
            self._log_buffer.setdefault(k, []).append(v.detach() if torch.is_tensor(v) else float(v))

    def flush(self, step: int, art: ArtifactDir, images_per_step: int, extra: dict | None = None) -> dict:
        """Reduce buffered metrics over steps and ranks, write JSONL, report to Ray Train."""
        out: dict[str, float] = {}
        for k, vals in self._log_buffer.items():
            t = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(())
                             for v in vals]).mean()
            if self.world > 1:
                dist.all_reduce(t)
                t = t / self.world
            out[k] = float(t)
        self._log_buffer.clear()
        out.update({"step": step, "kimg": step * images_per_step / 1000.0,
                    "time/wall_s": time.time() - self._t0, "nonfinite/total": self.nonfinite_total,
                    "resumed_from": self.resumed_from})
        out.update(extra or {})
        if self.is_main:
            with open(art.file("metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"stage": self.stage, **out}) + "\n")
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


def hash_seed(*parts: Any) -> int:
    import hashlib
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


def checkpoint_state(modules: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for k, m in modules.items():
        if isinstance(m, EMA):
            state[k] = m.shadow.state_dict()
            state[f"{k}.updates"] = m.updates
        elif hasattr(m, "state_dict"):
            state[k] = unwrap(m).state_dict() if isinstance(m, nn.Module) else m.state_dict()
    state["rng_cpu"] = torch.get_rng_state()
    return state


def restore_state(modules: dict[str, Any], state: dict[str, Any]) -> None:
    for k, m in modules.items():
        if k not in state:
            raise KeyError(f"checkpoint lacks {k!r}")
        if isinstance(m, EMA):
            m.shadow.load_state_dict(state[k])
            m.updates = int(state.get(f"{k}.updates", 0))
        elif isinstance(m, nn.Module):
            unwrap(m).load_state_dict(state[k])
        else:
            m.load_state_dict(state[k])
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])


def resume(ctx: StageContext, art: ArtifactDir, modules: dict[str, Any]) -> int:
    """Load the newest good checkpoint into `modules`; return the step to start from (0 if none)."""
    found = art.load_latest_checkpoint()
    if found is None:
        return 0
    step, state = found
    restore_state(modules, state)
    ctx.resumed_from = step
    if ctx.is_main:
        log.info("[%s] resumed from step %d (%s)", ctx.stage, step, art.path)
    return step


def save(ctx: StageContext, art: ArtifactDir, step: int, modules: dict[str, Any]) -> None:
    if ctx.is_main:
        art.save_checkpoint(step, checkpoint_state(modules))
    ctx.barrier()


def progress(ctx: StageContext, start: int, total: int) -> Iterator[int]:
    """Step iterator with a progress bar on the main rank (counts steps; metrics count images)."""
    if not ctx.is_main or total - start <= 0:
        yield from range(start, total)
        return
    from tqdm.auto import tqdm
    yield from tqdm(range(start, total), initial=start, total=total, desc=ctx.stage, leave=False,
                    mininterval=2.0, disable=os.environ.get("DMVAE_NO_PROGRESS") == "1")


def adamw(params, lr: float, device: torch.device, betas=(0.9, 0.999), weight_decay: float = 0.0):
    params = [p for p in params if p.requires_grad]
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler yielding this rank's dataset indices for steps `start..total-1` (global-batch
    permutations by epoch, as `StageContext.batch_indices`): the same order after a resume."""

    def __init__(self, ctx: StageContext, n: int, global_batch: int, start: int, total: int):
        self.ctx, self.n, self.gb, self.start, self.total = ctx, n, global_batch, start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.ctx.batch_indices(self.n, self.gb, step).tolist()

    def __len__(self) -> int:
        return max(self.total - self.start, 0)


def image_batches(ctx: StageContext, dataset, global_batch: int, start: int, total: int) -> Iterator:
    """`(img (b, 3, H, W), y (b,))` on the device for each step from `start`; loader workers from the
    config, pinned memory and non-blocking copies on GPU."""
    workers = ctx.cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(ctx, len(dataset), global_batch, start, total), num_workers=workers,
        pin_memory=ctx.device.type == "cuda", persistent_workers=False, prefetch_factor=4 if workers else None)
    for img, y in loader:
        yield img.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)


def apply_update(ctx: StageContext, step: int, loss: torch.Tensor, opt: torch.optim.Optimizer,
                 stats: dict[str, Any]) -> bool:
    """The guarded optimiser step every loop shares: skip (and count) a non-finite loss, else
    backward, step and log `stats`. Returns whether the update was applied."""
    if not ctx.finite_or_skip(loss):
        return False
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ctx.log(step, stats)
    return True
