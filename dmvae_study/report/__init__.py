"""Study report: every table and figure rebuilt from a study's results folder alone (no training).

    python -m dmvae_study.report results/table1-smoke [--out DIR] [--max-points 1000]

Reads `<study>/<stem>.csv` (`table1` or `ablations`; rebuilt from `rows/*.json` when missing), the
row manifests `rows/<row>.json` and the artifact folders they name (else each row's archive
`rows/<row>/`, `archive`: its curves, grids and t-SNE inputs, committed with the manifest), and writes into
`<study>/report/` (or `--out`):

- `<stem>.md`, `<stem>.tex`, `<stem>.csv`: the study table (paper Table 1 / Table 2 columns), and
  a per-row settings table when manifests record `derived` values or a seed;
- `fig8_gfid_vs_step.png`: stage-2 gFID against training step per row (paper Fig. 8), from the
  generator's `eval/gfid_curve` log; `fig8_fm_loss_vs_step.png` (flow-matching loss) when no row
  logged a curve (`generator.eval_every = 0`);
- `curves_<stage>.png`: per stage (tokenizer, teacher, dmd, refine, generator), a panel per metric
  it logs (`loss/rec`, `loss/gan_g`, `loss/dm`, `match/swd`, ...) against step, one line per row;
- `fig4_tsne.png`: t-SNE of each row's latents next to its reference set (paper Fig. 4);
- `grids/<row>_samples.png`, `grids/<row>_reconstructions.png`: the eval stage's image grids;
- `report.html` and `report.md`: one page embedding all of the above with relative links.

Modules: `study` (reading the folder), `tables`, `curves`, `tsne`, `archive` (the row archives), `page`
(the page model and its Markdown / HTML renderings), `build` (the report and the CLI).
"""

from dmvae_study.report.build import build_report, copy_grids, main
from dmvae_study.report.curves import (CURVE_FIGSIZE, DPI, STAGE_CURVES, plot_generator_curves, plot_stages,
                                       read_metrics, stage_curves, stage_figsize)
from dmvae_study.report.study import (RESULT_COLUMNS, STUDY_STEMS, Study, StudyRow, load_manifests, load_study,
                                      row_result)
from dmvae_study.report.tables import TABLE_COLUMNS, display_table, random_init_rows, row_settings, write_tables
from dmvae_study.report.tsne import pca_points, plot_tsne, select, tsne_embed, tsne_figsize

__all__ = ["CURVE_FIGSIZE", "DPI", "RESULT_COLUMNS", "STAGE_CURVES", "STUDY_STEMS", "TABLE_COLUMNS", "Study",
           "StudyRow", "build_report", "copy_grids", "display_table", "load_manifests", "load_study", "main",
           "pca_points", "plot_generator_curves", "plot_stages", "plot_tsne", "random_init_rows", "read_metrics",
           "row_result", "row_settings", "select", "stage_curves", "stage_figsize", "tsne_embed", "tsne_figsize",
           "write_tables"]
