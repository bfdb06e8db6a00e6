"""LightningDiT training step (teacher and stage-2 generator, `trainers.flowfit.fit_flow_model`):
flow-matching forward + backward + gradient clipping + AdamW + EMA on 16x16x32 latents, patch 1,
1000 classes, sizes tiny..XL.

Two step variants:

- `--mode trainer` (default) replays the host-side work of `fit_flow_model` per step with the trainer's
  own helpers: `StageContext.batch_indices` (a permutation of the whole dataset, `--dataset-size`,
  ImageNet's 1,281,167 by default), a gather from a CPU latent pool and a pageable host-to-device copy,
  t / eps / label drops drawn on a CPU generator and copied, `StageContext.finite_or_skip` (one
  `.item()` host sync per step), `clip_grad_norm_`, `trainers.common.Optim` (AdamW, fused on CUDA) and
  `trainers.common.EMA.update` (a `state_dict()` walk and one `lerp_` per tensor).
- `--mode lean`: the same math with the host work removed (latents, t, eps, drops drawn on the device,
  no per-step sync, EMA as one `torch._foreach_lerp_`): what BENCHMARKS.md recommends for the trainer.

FLOPs are counted on the meta device (no memory, any size) for the un-checkpointed network, so
`--grad-ckpt` shows its recompute as lower % of peak. `--count-only` prints the FLOP table and exits.

    python -m benchmarks.bench_dit --size tiny,Mini --batch 8 --steps 5           # CPU
    python -m benchmarks.bench_dit --size XL --batch 32 --compile --steps 20      # one H100 (per-GPU batch)
    python -m benchmarks.bench_dit --size XL --batch 256 --grad-ckpt --compile     # 256 fits only with ckpt
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import torch

from benchmarks.common import (Result, autocast, base_parser, count_flops, matmul_peak, median, peak_memory_mib,
                               precision_label, report, reset_peak_memory, setup, split_list, time_calls)
from dmvae_study.presets import preset
from dmvae_study.models.lightningdit import LIGHTNINGDIT_PRESETS, LightningDiT, build_lightningdit
from dmvae_study.objectives.flow import FlowMatchingLoss, sample_t
from trainers import flowfit

IMAGENET_TRAIN = 1_281_167


def build_net(size: str, latent: tuple[int, int, int], num_classes: int, patch: int = 1,
              grad_ckpt: bool = False, device: torch.device | str | None = None) -> LightningDiT:
    """The DiT of `size` for `latent (C, H, W)`; built under the ambient device unless `device` is given."""
    c, h, w = latent
    net = build_lightningdit(size, in_channels=c, input_size=(h, w), patch_size=patch, num_classes=num_classes,
                             class_dropout=0.1, grad_checkpointing=grad_ckpt)
    return net if device is None else net.to(device)


def dit_flops(size: str, batch: int, latent: tuple[int, int, int] = (32, 16, 16), num_classes: int = 1000,
              patch: int = 1, train: bool = True, cfg: bool = False) -> int:
    """Model FLOPs of one flow-matching training step (forward + backward) or, with `train=False`, one
    forward (`cfg=True`: the batched cond + null pass of `forward_cfg`), counted on the meta device."""
    with torch.device("meta"):
        net = build_net(size, latent, num_classes, patch)
        x = torch.randn(batch, *latent)
        y = torch.zeros(batch, dtype=torch.long)
        t = torch.full((batch,), 0.5)
    if train:
        fm = FlowMatchingLoss()

        def run() -> None:
            loss, _ = fm(net, x, y, t=t, eps=torch.randn_like(x))
            loss.backward()
    else:
        def run() -> None:
            with torch.no_grad():
                net.forward_cfg(x, t, y, 2.0 if cfg else 1.0)
    return count_flops(run)


def dit_macs_analytic(size: str, tokens: int, in_channels: int = 32, patch: int = 1) -> float:
    """Forward multiply-accumulates per image from the layer shapes (DESIGN.md sizes): per block and token
    qkv + proj 4H^2, SwiGLU 3 H F (F = int(2/3 int(4H))), attention 2 N H; plus patch embed and output."""
    depth, hidden, _ = LIGHTNINGDIT_PRESETS[size]
    ffn = int(2 / 3 * int(4.0 * hidden))
    per_token_block = 4 * hidden**2 + 3 * hidden * ffn + 2 * tokens * hidden
    io = tokens * hidden * in_channels * patch * patch * 2
    return float(depth * tokens * per_token_block + io)


STEP = flowfit.step  # the teacher / stage-2 loop body


class _StepState:
    """A DiT with its optimiser and EMA. `trainer` mode runs the stage's own step (`trainers.flowfit.step`,
    the teacher / stage-2 loop body) with the trainer's batch indexing; `lean` is a minimal loop for comparison."""

    def __init__(self, size: str, *, batch: int, latent: tuple[int, int, int], num_classes: int, patch: int,
                 device: torch.device, precision: str, compile: bool, grad_ckpt: bool, mode: str,
                 dataset_size: int, seed: int):
        from dmvae_study.config import TeacherConfig
        from trainers.common import EMA, Optim, StageContext
        from trainers.flowfit import FlowState
        self.device, self.precision, self.batch, self.latent, self.mode = device, precision, batch, latent, mode
        self.net = build_net(size, latent, num_classes, patch, grad_ckpt, device)
        dcfg = TeacherConfig(size=size, patch_size=patch, batch_size=batch, time_sampling="logit_normal",
                             grad_checkpointing=grad_ckpt)
        self.opt = Optim(self.net.parameters(), dcfg, device)
        self.ema = EMA(self.net, 0.9999)
        self.ema.shadow.to(device)
        self.fwd = torch.compile(self.net) if compile else self.net
        self.fm = FlowMatchingLoss(time_sampling="logit_normal")
        self.num_classes, self.dataset_size, self.step_i = num_classes, dataset_size, 0
        pool = 4 * batch
        if mode == "trainer":
            cfg = preset("smoke", {"run.seed": seed, "run.precision": precision_label(device, precision)})
            self.ctx = StageContext(cfg=cfg, stage="teacher", device=device)
            self.state = FlowState(self.ctx, dcfg, self.net, self.fwd, self.ema, self.opt, self.fm, tuple(latent))
            self.x_pool = torch.randn(pool, *latent)                       # CPU, as the trainer's ref.x
            self.y_pool = torch.randint(0, num_classes, (pool,))
        elif mode == "lean":
            self.x_pool = torch.randn(pool, *latent, device=device)
            self.y_pool = torch.randint(0, num_classes, (pool,), device=device)
            self.params = [p for p in self.net.parameters()]
            self.shadow = [p for p in self.ema.shadow.parameters()]
        else:
            raise ValueError(f"unknown mode {mode!r}; choose trainer or lean")

    def step(self) -> torch.Tensor | None:
        b, dev, step = self.batch, self.device, self.step_i
        self.step_i += 1
        if self.mode == "trainer":  # fit_flow_model's loop body: the trainer's indexing, then its step
            idx = self.ctx.batch_indices(self.dataset_size, b, step) % self.x_pool.shape[0]
            STEP(self.state, step, self.x_pool[idx].to(dev, non_blocking=True).float(), self.y_pool[idx].to(dev))
            return None
        idx = torch.randint(0, self.x_pool.shape[0], (b,), device=dev)
        t = sample_t(b, kind="logit_normal", device=dev)
        eps, drop = torch.randn((b, *self.latent), device=dev), torch.rand(b, device=dev) < 0.1
        with autocast(self.device, self.precision):
            loss, _ = self.fm(lambda xt, tt, yy: self.fwd(xt, tt, yy, force_drop=drop), self.x_pool[idx],
                              self.y_pool[idx], t=t, eps=eps)
        self.opt.step(loss)
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.ema.decay)
        return loss


def make_step(size: str, **kw: Any) -> Callable[[], torch.Tensor | None]:
    """A zero-argument DiT training step (see `_StepState` for the keywords)."""
    return _StepState(size, **kw).step


def measure(size: str, *, batch: int, latent: tuple[int, int, int], num_classes: int, patch: int,
            device: torch.device, precision: str, compile: bool, grad_ckpt: bool, mode: str, dataset_size: int,
            seed: int, steps: int, warmup: int, peak: float | None) -> Result:
    reset_peak_memory(device)
    step = make_step(size, batch=batch, latent=latent, num_classes=num_classes, patch=patch, device=device,
                     precision=precision, compile=compile, grad_ckpt=grad_ckpt, mode=mode,
                     dataset_size=dataset_size, seed=seed)
    secs = time_calls(step, device, warmup=warmup, repeats=steps)
    flops = dit_flops(size, batch, latent, num_classes, patch)
    tags = [precision_label(device, precision)] + [s for s, on in (("compile", compile), ("ckpt", grad_ckpt),
                                                                    ("lean", mode == "lean")) if on]
    c, h, w = latent
    return Result("dit_train", f"{size}/{patch} {c}x{h}x{w} {' '.join(tags)}", device.type, batch, median(secs),
                  batch, flops, peak, peak_memory_mib(device),
                  extra={"min_ms": round(min(secs) * 1e3, 2), "max_ms": round(max(secs) * 1e3, 2)})


def parse_latent(s: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in s.lower().split("x"))
    if len(parts) != 3:
        raise ValueError(f"--latent wants CxHxW, got {s!r}")
    return parts  # type: ignore[return-value]


def count_table(sizes: Sequence[str], latent: tuple[int, int, int], num_classes: int, patch: int) -> list[dict]:
    c, h, w = latent
    tokens = (h // patch) * (w // patch)
    rows = []
    for s in sizes:
        fwd = dit_flops(s, 1, latent, num_classes, patch, train=False)
        train = dit_flops(s, 1, latent, num_classes, patch, train=True)
        with torch.device("meta"):
            n = sum(p.numel() for p in build_net(s, latent, num_classes, patch).parameters())
        rows.append({"size": s, "params": n, "fwd_gflop": fwd / 1e9, "train_gflop": train / 1e9,
                     "train_over_fwd": train / fwd, "analytic_fwd_gmac": dit_macs_analytic(s, tokens, c, patch) / 1e9})
    print("| size | params | fwd GFLOP/img (FlopCounter) | fwd GMAC analytic | train GFLOP/img | train/fwd |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params']:,} | {r['fwd_gflop']:.2f} | {r['analytic_fwd_gmac']:.2f} | "
              f"{r['train_gflop']:.2f} | {r['train_over_fwd']:.3f} |")
    return rows


def main(argv: Sequence[str] | None = None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--size", default=None, help="comma list of sizes (default: tiny on CPU, XL on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch per step (default: 8 on CPU, 32 on CUDA: the official per-GPU batch, 1024 over 32 "
                        "GPUs; XL at 256 needs --grad-ckpt in 80 GB)")
    p.add_argument("--latent", default="32x16x16", help="latent CxHxW (paper: 32x16x16)")
    p.add_argument("--patch", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
    p.add_argument("--mode", default="trainer", help="trainer, lean, or trainer,lean (one row each, same process)")
    p.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN, help="what batch_indices permutes per step")
    p.add_argument("--count-only", action="store_true", help="print the FLOP table (meta device) and exit")
    args = p.parse_args(argv)
    device = setup(args)
    latent = parse_latent(args.latent)
    sizes = split_list(args.size or ("XL" if device.type == "cuda" else "tiny"))
    if args.count_only:
        rows = count_table(sizes, latent, args.num_classes, args.patch)
        if args.json:
            import json
            from pathlib import Path
            Path(args.json).write_text(json.dumps({"flops": rows}, indent=1))
        return {"flops": rows}
    batch = args.batch or (32 if device.type == "cuda" else 8)
    peak = matmul_peak(device, args.peak_n)
    modes = split_list(args.mode)
    if not modes or set(modes) - {"trainer", "lean"}:
        p.error(f"--mode takes trainer, lean or both, got {args.mode!r}")
    results = [measure(s, batch=batch, latent=latent, num_classes=args.num_classes, patch=args.patch, device=device,
                       precision=args.precision, compile=args.compile, grad_ckpt=args.grad_ckpt, mode=m,
                       dataset_size=args.dataset_size, seed=args.seed, steps=args.steps, warmup=args.warmup,
                       peak=peak) for s in sizes for m in modes]
    return report(results, device=device, peak_tflops=peak, json_path=args.json, argv=argv if argv is not None
                  else sys.argv[1:])


if __name__ == "__main__":
    main()
