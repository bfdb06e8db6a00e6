"""Table 1 of the paper: which reference distribution makes the best latent space?

    python studies/table1.py --preset smoke            # minutes on a laptop, local Ray
    python studies/table1.py --preset fmnist           # a real small study, CPU-hours
    python studies/table1.py --preset imagenet256      # the paper setting, on a GPU cluster

One Ray Tune trial per row (the vae and vavae baselines, then each prior; per seed with --seeds),
each running that row's stages. Work two rows share (the DMVAE tokenizer, the beta-VAE that is also
the ldm_noise prior's LDM) runs once first. Every row is resolved before Ray starts: data-derived
priors get DM weight 10, synthetic ones 1 (Sec. 4) unless `--set dmd.dm_weight=...` sets it for all.
Writes table1.{csv,parquet,md,tex} and rows/<row>.json under <out>/table1-<preset>/. Rerunning the
same command resumes; `--restart` starts the Tune experiment over (finished stages are reused).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd

from studies.common import UserError, cli, parser, prepare, split_list
from studies.trials import run_study


@cli
def main(argv: list[str] | None = None) -> pd.DataFrame | None:
    from priors import ROWS
    p = parser(__doc__)
    p.add_argument("--priors", default=",".join(ROWS), help=f"comma-separated rows (default: all): {', '.join(ROWS)}")
    args = p.parse_args(argv)
    rows = split_list(args.priors, "--priors")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise UserError(f"--priors: unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    study = prepare(args, f"table1-{args.preset}", {r: {"prior.name": r} for r in rows})
    if study is None:
        return None
    return run_study(study, "table1", f"Table 1 ({args.preset}): reference distributions")


if __name__ == "__main__":
    main()
