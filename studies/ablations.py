"""Table 2 of the paper: ablations of the DMD stage, one factor at a time from the default.

    python studies/ablations.py --axis dm_weight --axis cfg_scale [--preset smoke]
    python studies/ablations.py --sweep dmd.vae_every=1,5,10      # any dotted config field

Axes (paper values): score_net_size S / L / XL (teacher and fake net), timestep_schedule uniform /
anneal, dm_weight 1 / 10 / 100, cfg_scale 1 / 3 / 5. The default row is the preset's config with
the DINOv2 prior; each other row changes one field. Writes ablations.{csv,parquet,md,tex}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import yaml

from studies.common import parser, run_tune, study_config, write_tables

AXES: dict[str, tuple[str, list]] = {
    "score_net_size": ("teacher.size", ["S", "L", "XL"]),
    "timestep_schedule": ("dmd.timestep_schedule", ["uniform", "anneal"]),
    "dm_weight": ("dmd.dm_weight", [1.0, 10.0, 100.0]),
    "cfg_scale": ("dmd.cfg_scale", [1.0, 3.0, 5.0]),
}
SMOKE_SIZES = ["tiny", "Mini"]  # S / L / XL are GPU sizes; the smoke preset sweeps CPU sizes


def grid(axes: list[str], sweeps: list[str], preset_name: str, base_prior: str) -> dict[str, dict]:
    """Row name -> dotted overrides: the default row plus one row per non-default value."""
    from dmvae_study.config import preset
    base = preset(preset_name).to_dict()
    rows: dict[str, dict] = {"default": {"prior.name": base_prior}}
    pairs = [AXES[a] for a in axes]
    for s in sweeps:
        key, _, vals = s.partition("=")
        pairs.append((key, [yaml.safe_load(v) for v in vals.split(",")]))
    for key, values in pairs:
        if key == "teacher.size" and preset_name == "smoke":
            values = SMOKE_SIZES
        node = base
        for k in key.split("."):
            node = node[k]
        for v in values:
            if v != node:
                rows[f"{key.split('.')[-1]}={v}"] = {"prior.name": base_prior, key: v}
    return rows


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = parser(__doc__)
    p.add_argument("--axis", action="append", default=[], choices=sorted(AXES), help="paper axis (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="any dotted field")
    p.add_argument("--prior", default="dinov2", help="reference distribution of every row (paper: DINO)")
    args = p.parse_args(argv)
    if not args.axis and not args.sweep:
        p.error("give at least one --axis or --sweep")
    name = "ablations-" + args.preset
    cfg = study_config(args, name)
    rows = grid(args.axis, args.sweep, args.preset, args.prior)
    from studies.common import init_ray
    from trainers.launch import run_pipeline
    init_ray(args.address)
    # Shared by every row that does not change them: tokenizer pretrain, reference set, default teacher.
    run_pipeline(cfg.replace(prior=cfg.prior.replace(name=args.prior)), stages=["tokenizer", "reference", "teacher"])
    df = run_tune(cfg, rows, args.address)
    if len(df):
        df = df.set_index("row").loc[[r for r in rows if r in set(df["row"])]].reset_index()
    root = Path(cfg.run.out_dir) / cfg.run.name
    show = write_tables(df, root, "ablations", f"Table 2 ({args.preset}): DMD ablations, prior {args.prior}")
    print(show.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nwrote {root}/ablations.csv, .parquet, .md, .tex")
    return df


if __name__ == "__main__":
    main()
