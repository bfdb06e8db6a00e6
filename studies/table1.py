"""Table 1 of the paper: which reference distribution makes the best latent space?

    python studies/table1.py --preset smoke            # minutes on a laptop, local Ray
    python studies/table1.py --preset fmnist           # a real small study, CPU-hours
    python studies/table1.py --preset imagenet256      # the paper setting, on a GPU cluster

One Ray Tune trial per row (the vae and vavae baselines, then each prior), each running that row's
stages on its own Ray Train workers. Shared work runs once first: the tokenizer pretrain that
every DMVAE row starts from. Data-derived priors get DM weight 10, synthetic ones 1 (paper Sec. 4),
unless `--set prior.dm_weight=...`. Writes table1.{csv,parquet,md,tex} under <out>/table1-<preset>/.
Rerunning the same command resumes; `--restart` starts over.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from studies.common import parser, run_tune, study_config, write_tables


def row_overrides(prior: str) -> dict:
    """A row's config changes: its prior, and the Sec. 4 DM-weight heuristic by prior kind."""
    from priors import BASELINE_ROWS, default_dm_weight
    if prior in BASELINE_ROWS:
        return {"prior.name": prior}
    return {"prior.name": prior, "dmd.dm_weight": default_dm_weight(prior)}


def main(argv: list[str] | None = None) -> pd.DataFrame:
    from priors import ROWS
    p = parser(__doc__)
    p.add_argument("--priors", default=",".join(ROWS),
                   help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.priors.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        p.error(f"unknown prior(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    cfg = study_config(args, f"table1-{args.preset}")

    from studies.common import init_ray
    from trainers.launch import run_pipeline
    init_ray(args.address)
    # Shared work, once, before the trials: the AE every DMVAE row starts from, and the beta-VAE
    # that is both the vae row and the LDM of the ldm_noise prior.
    if any(r not in ("vae", "vavae") for r in rows):
        run_pipeline(cfg.replace(prior=cfg.prior.replace(name="gaussian")), stages=["tokenizer"])
    if "ldm_noise" in rows:
        run_pipeline(cfg.replace(prior=cfg.prior.replace(name="vae")), stages=["tokenizer"])
    df = run_tune(cfg, {r: row_overrides(r) for r in rows}, args.address)
    df = df.set_index("row").loc[[r for r in rows if r in set(df["row"])]].reset_index() if len(df) else df
    root = Path(cfg.run.out_dir) / cfg.run.name
    show = write_tables(df, root, "table1", f"Table 1 ({args.preset}): reference distributions")
    print(show.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nwrote {root}/table1.csv, .parquet, .md, .tex")
    return df


if __name__ == "__main__":
    main()
