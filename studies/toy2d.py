"""The 2D toy study (paper Sec. 3.3, Fig. 3, App. B): every DM objective variant, measured.

    python studies/toy2d.py [--preset smoke|default] [--out DIR] [--set key=value ...]

Trains the real score model once (an artifact, reused on rerun), then runs each objective as one
Ray Tune trial on the local Ray cluster, and writes `toy2d.csv`, `toy2d.md`, `fig3.png` (a panel per
objective, the reference faint behind) and `gradient_field.png` (App. B: DM update directions at
forced t) under `<out>/toy2d-<preset>/`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch

from dmvae_study.configlib import apply_overrides
from dmvae_study.objectives.dm import FIG3_OBJECTIVES
from dmvae_study.store import ArtifactStore, load_torch, save_torch
from dmvae_study.toy2d import ToyConfig, build_toy_net, gradient_field, run_objective, sample_sshape, train_real_model

# Fig. 3 (b) ours; (d-f) real-score maximisation; (g-i) fake-score maximisation; (j-l) score-difference
# minimisation, each with its three stop-gradient placements; loss-difference minimisation.
ALL_OBJECTIVES = FIG3_OBJECTIVES

PRESETS = {
    # CI: three objectives, a tiny net, 512 points; about 2 minutes on 2 CPU cores.
    "smoke": ToyConfig(real_size="tiny", real_steps=300, real_batch=512, num_points=512, steps=300,
                       eval_every=50, eval_samples=1024, objectives=("dm", "real_score_1", "fake_score_1")),
    # Every objective plus DM with annealing, the paper's 1536 points, under 20 minutes on 2 CPU cores:
    # the score nets are the tiny LightningDiT (2 blocks, width 64) rather than Mini.
    "default": ToyConfig(real_size="tiny", real_steps=3000, steps=2500, eval_every=100,
                         objectives=ALL_OBJECTIVES + ("dm_anneal",)),
    # The paper's setting (Sec. 3.3, official toy): LightningDiT-Mini score nets; GPU or CPU-hours.
    "paper": ToyConfig(real_size="Mini", real_steps=20000, steps=10000, objectives=ALL_OBJECTIVES + ("dm_anneal",)),
}
FORCED_T = (0.1, 0.3, 0.5, 0.7, 0.9)


def real_model(cfg: ToyConfig, out: Path) -> tuple[torch.nn.Module, Path]:
    """The real score model for this config: loaded when its artifact exists, else trained and saved."""
    keys = {k: getattr(cfg, k) for k in ("real_size", "real_steps", "real_batch", "real_lr", "seed")}
    art = ArtifactStore(out / "store").artifact("toy_real", keys)
    net = build_toy_net(cfg.real_size)
    if art.done:
        net.load_state_dict(load_torch(art.file("real.pt")))
        print(f"[toy2d] reusing the real score model {art.path}")
        return net.eval(), art.path
    net, losses = train_real_model(cfg, progress=True)
    save_torch(art.file("real.pt"), net.state_dict())
    art.write_config(keys)
    art.mark_done({"final_loss": sum(losses[-50:]) / len(losses[-50:])})
    return net, art.path


def trial(config: dict) -> None:
    """One Tune trial: one objective from the shared start; reports measurements, saves points."""
    from ray import tune
    cfg = ToyConfig.from_dict(config["toy"])
    name = config["objective"]
    objective, anneal = ("dm", True) if name == "dm_anneal" else (name, cfg.anneal)
    cfg = cfg.replace(anneal=anneal)
    torch.set_num_threads(1)
    real = build_toy_net(cfg.real_size)
    real.load_state_dict(load_torch(Path(config["real_dir"]) / "real.pt"))
    points, summary, _ = run_objective(cfg, objective, real, report=lambda m: tune.report(m))
    save_torch(Path(config["out"]) / "points" / f"{name}.pt", points)
    tune.report({**summary, "done": 1})


def run(cfg: ToyConfig, out: Path, name: str = "toy2d") -> pd.DataFrame:
    import ray
    from ray import tune
    out.mkdir(parents=True, exist_ok=True)
    real, real_dir = real_model(cfg, out)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, num_cpus=os.cpu_count(), log_to_driver=False,
                 _temp_dir=os.environ.get("RAY_TMPDIR"))
    space = {"objective": tune.grid_search(list(cfg.objectives)), "toy": cfg.to_dict(),
             "real_dir": str(real_dir), "out": str(out.resolve())}
    tuner = tune.Tuner(
        tune.with_resources(trial, {"CPU": 1}),
        param_space=space,
        run_config=tune.RunConfig(name=name, storage_path=str((out / "ray").resolve()), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for r in grid:
        if r.error:
            raise RuntimeError(f"toy trial {r.config['objective']} failed: {r.error}")
        m = r.metrics
        rows.append({"objective": r.config["objective"], **{k: m[k] for k in (
            "energy", "swd", "coverage", "nn_dist", "pair_dist", "steps_to_threshold", "wall_s_per_1k_steps",
            "peak_rss_mib")}})
    df = pd.DataFrame(rows).set_index("objective").loc[list(cfg.objectives)]
    ref = sample_sshape(cfg.eval_samples, seed=cfg.seed + 777)
    from dmvae_study.toy2d import spread, coverage
    nn_d, pair = spread(ref[: cfg.num_points])
    df.loc["reference"] = {"energy": 0.0, "swd": 0.0, "coverage": coverage(ref[: cfg.num_points]),
                           "nn_dist": nn_d, "pair_dist": pair}
    df.to_csv(out / "toy2d.csv")
    (out / "toy2d.md").write_text(df.to_markdown(floatfmt=".4g") + "\n")
    plot_panels(cfg, out, ref)
    plot_gradient_field(cfg, out, real, ref)
    return df


def plot_panels(cfg: ToyConfig, out: Path, ref: torch.Tensor) -> None:
    """Fig. 3 layout: one panel per objective, final points over the faint reference."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(cfg.objectives)
    cols = min(len(names), 5)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        pts = load_torch(out / "points" / f"{name}.pt")
        ax.axis("on")
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="#bbbbbb", alpha=0.4, linewidths=0)
        ax.scatter(pts[:, 0], pts[:, 1], s=3, c="#e69500", alpha=0.7, linewidths=0)
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal", title=name, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "fig3.png", dpi=110)
    plt.close(fig)


def plot_gradient_field(cfg: ToyConfig, out: Path, real: torch.nn.Module, ref: torch.Tensor) -> None:
    """App. B: DM update directions on the uniform start at forced t, fake = real at initialisation
    would cancel exactly, so the fake net is the one fitted to the start (a short fit)."""
    import copy

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dmvae_study.objectives.dm import fake_score_loss
    torch.manual_seed(cfg.seed)
    start = torch.rand(256, 2) * 3.0 - 1.5
    fake = copy.deepcopy(real).train().requires_grad_(True)
    opt = torch.optim.AdamW(fake.parameters(), lr=1e-3, weight_decay=0.0)
    pool = torch.rand(4096, 2) * 3.0 - 1.5
    for _ in range(min(cfg.real_steps, 300)):
        batch = pool[torch.randint(0, pool.shape[0], (512,))]
        loss = fake_score_loss(fake, batch.reshape(-1, 2, 1, 1), torch.zeros(512, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    fake.eval().requires_grad_(False)
    fig, axes = plt.subplots(1, len(FORCED_T), figsize=(3.2 * len(FORCED_T), 3.4))
    for ax, t in zip(axes, FORCED_T):
        g = gradient_field("dm", real, fake, start, t, seed=cfg.seed)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-8) * 0.15
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="#bbbbbb", alpha=0.4, linewidths=0)
        ax.quiver(start[:, 0], start[:, 1], g[:, 0], g[:, 1], angles="xy", scale_units="xy", scale=1.0,
                  width=0.004, color="#555555")
        ax.set(xlim=(-1.6, 1.6), ylim=(-1.6, 1.6), aspect="equal", title=f"t = {t}", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "gradient_field.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--out", default="results", help="results root")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ToyConfig field, e.g. --set steps=5000 --set anneal=true")
    args = p.parse_args(argv)
    cfg = apply_overrides(PRESETS[args.preset], args.overrides) if args.overrides else PRESETS[args.preset]
    out = Path(args.out) / f"toy2d-{args.preset}"
    df = run(cfg, out)
    print(df.to_markdown(floatfmt=".4g"))
    print(f"\nwrote {out}/toy2d.csv, toy2d.md, fig3.png, gradient_field.png")
    return df


if __name__ == "__main__":
    main()
