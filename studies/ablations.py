"""Table 2 of the paper: ablations of the DMD stage, one factor at a time from the default.

    python studies/ablations.py --axis dm_weight --axis cfg_scale [--preset smoke]
    python studies/ablations.py --sweep dmd.vae_every=1,5,10      # any dotted config field

Axes (Sec. 5.1, Table 2): score_net_size S / L / XL (teacher and fake net; tiny / Mini on CPU presets),
timestep_schedule uniform / anneal, dm_weight 1 / 20 / 100 around the default 10 (the paper names 1 and
100, the official `train_dmd.sh` recommends 10 or 20), cfg_scale 1 / 3 / 5. The default row is the
preset's config with the DINOv2 prior (DM weight 10); each other row changes one field. As in Sec. 5.1
each tokenizer trains 250k DMD iterations at `imagenet256` (Table 1: 300k) unless `--set
dmd.total_steps` says otherwise. `--set` applies to every row; an axis value wins on its own field.
Writes ablations.{csv,parquet,md,tex}.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import yaml

from studies.common import UserError, base_config, cli, parser, prepare, split_list
from studies.trials import run_study

AXES: dict[str, tuple[str, list]] = {
    "score_net_size": ("teacher.size", ["S", "L", "XL"]),
    "timestep_schedule": ("dmd.timestep_schedule", ["uniform", "anneal"]),
    "dm_weight": ("dmd.dm_weight", [1.0, 10.0, 20.0, 100.0]),
    "cfg_scale": ("dmd.cfg_scale", [1.0, 3.0, 5.0]),
}
CPU_SIZES = ["tiny", "Mini"]  # S / L / XL are GPU sizes; CPU presets sweep these
ABLATION_DMD_STEPS = {"imagenet256": 250_000}  # Sec. 5.1: "Each tokenizer is trained for 250K iterations"


def axis_values(axes: list[str], sweeps: list[str], preset_name: str) -> list[tuple[str, list]]:
    pairs = [(AXES[a][0], CPU_SIZES if a == "score_net_size" and preset_name != "imagenet256" else AXES[a][1])
             for a in axes]
    for s in sweeps:
        key, sep, vals = s.partition("=")
        if not sep or not vals:
            raise UserError(f"--sweep {s!r}: expected KEY=V1,V2, e.g. --sweep dmd.vae_every=1,5,10")
        pairs.append((key, split_list(vals, f"--sweep {key}", yaml.safe_load)))
    return pairs


def grid(pairs: list[tuple[str, list]], default: dict, base_prior: str) -> dict[str, dict]:
    """Row name -> dotted overrides: the default row plus one row per value of each axis that differs
    from the default row's *resolved* value (the prior's DM weight by kind, or the user's `--set`)."""
    rows: dict[str, dict] = {"default": {"prior.name": base_prior}}
    for key, values in pairs:
        node = default
        for k in key.split("."):
            if not isinstance(node, dict) or k not in node:
                raise UserError(f"--sweep {key}: unknown config key")
            node = node[k]
        for v in values:
            if v != node:
                rows[f"{key.split('.')[-1]}={v}"] = {"prior.name": base_prior, key: v}
    return rows


@cli
def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    p = parser(__doc__)
    p.add_argument("--axis", action="append", default=[], choices=sorted(AXES), help="paper axis (repeatable)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2", help="any dotted field")
    p.add_argument("--prior", default="dinov2", help="reference distribution of every row (paper: DINO)")
    args = p.parse_args(argv)
    if not args.axis and not args.sweep:
        raise UserError("give at least one --axis or --sweep")
    for a in sorted({a for a in args.axis if args.axis.count(a) > 1}):
        print(f"note: --axis {a} given twice; running it once", file=sys.stderr)
    axes = list(dict.fromkeys(args.axis))
    steps = ABLATION_DMD_STEPS.get(args.preset)
    if steps and not any(o.startswith("dmd.total_steps=") for o in args.overrides):
        args.overrides = [f"dmd.total_steps={steps}", *args.overrides]
    from dmvae_study.pipeline import resolve
    name = f"ablations-{args.preset}"
    pairs = axis_values(axes, args.sweep, args.preset)
    rows = grid(pairs, resolve(base_config(args, name), args.prior).to_dict(), args.prior)
    study = prepare(args, name, rows)
    if study is None:
        return None
    header = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in pairs)
    return run_study(study, "ablations", f"Table 2 ({args.preset}): DMD ablations, prior {args.prior} ({header})")


if __name__ == "__main__":
    main()
