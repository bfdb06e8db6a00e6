"""The study report rebuilds tables and figures from a results folder alone.

The fixture writes a synthetic study folder in the layout `studies/*.py` and the stages produce
(table CSV, row manifests, artifact folders with metrics.jsonl, latent cache, reference shards and
eval PNGs): no training runs here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dmvae_study import report
from dmvae_study.reference import ReferenceSet
from dmvae_study.report.archive import archive_study
from dmvae_study.store import ArtifactDir, save_torch

ROWS = ("vae", "dinov2", "gaussian")  # a baseline, a data-derived prior, a synthetic unlabelled prior


def _art(root: Path, kind: str, row: str) -> ArtifactDir:
    art = ArtifactDir(root / "store" / kind / f"{kind}-{row}")
    art.path.mkdir(parents=True, exist_ok=True)
    art.mark_done({})
    return art


def _metrics(art: ArtifactDir, records: list[dict]) -> None:
    lines = [json.dumps(r) for r in records]
    art.file("metrics.jsonl").write_text("\n".join(lines) + "\n{\"stage\": \"torn")  # a crash mid-write


def _curve(stage: str, steps: tuple[int, ...], at_step_1: dict[str, float]) -> list[dict]:
    """`metrics.jsonl` records of a falling curve per key: `value / sqrt(step)`."""
    return [{"stage": stage, "step": s, "kimg": s * 0.064, **{k: v / s ** 0.5 for k, v in at_step_1.items()}}
            for s in steps]


def make_study(root: Path, curves: bool = True, n: int = 160, classes: int = 4) -> Path:
    """A 3-row Table 1 study folder: `root/table1-smoke/`. DMVAE rows share the plain-AE tokenizer
    artifact, as `trainers/artifacts.py` keys it; the baseline trains its own."""
    study = root / "table1-smoke"
    g = torch.Generator().manual_seed(0)
    records = []
    shared_ae = _art(study, "tokenizer", "ae")
    _metrics(shared_ae, _curve("tokenizer", (10, 20, 30),
                               {"loss/rec": 1.0, "loss/l1": 0.5, "loss/gan_g": 0.3, "loss/disc": 1.4}))
    for i, row in enumerate(ROWS):
        arts: dict[str, ArtifactDir] = {}
        y = torch.arange(n) % classes
        z = torch.randn(n, 4, 2, 2, generator=g) + y.view(-1, 1, 1, 1).float()  # class-separated latents
        arts["latents"] = _art(study, "latents", row)
        save_torch(arts["latents"].file("latents.pt"), {"z": z.half(), "y": y})
        arts["generator"] = _art(study, "generator", row)
        gen = [{"stage": "generator", "step": s, "kimg": s * 0.064, "loss/fm": 2.0 / s + 0.05 * i}
               | ({"eval/gfid_curve": 300.0 - 2 * s + 10 * i, "eval/gfid_curve_n": 64} if curves and row != "gaussian"
                  else {}) for s in (10, 20, 30, 20, 30, 40)]  # 20, 30 repeat: a resumed run
        _metrics(arts["generator"], gen)
        arts["eval"] = _art(study, "eval", row)
        for kind, size in (("samples", (136, 136)), ("reconstructions", (136, 104))):
            pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(arts["eval"].file(f"{kind}.png"))
        if row == "vae":
            arts["tokenizer"] = _art(study, "tokenizer", row)
            _metrics(arts["tokenizer"], _curve("tokenizer", (10, 20, 30),
                                               {"loss/rec": 0.9, "loss/l1": 0.4, "loss/kl": 0.1}))
        else:
            arts["tokenizer"] = shared_ae
            arts["reference"] = _art(study, "reference", row)
            labelled = row == "dinov2"
            ref = ReferenceSet.standardised(torch.randn(n, 8, 1, 1, generator=g) + (y.view(-1, 1, 1, 1) if labelled else 0),
                                            y if labelled else None, num_classes=classes if labelled else 0,
                                            provenance={"prior": row, "kind": "data" if labelled else "synthetic"})
            ref.save(arts["reference"], shard_size=64)
            arts["teacher"] = _art(study, "teacher", row)
            _metrics(arts["teacher"], _curve("teacher", (10, 20, 30), {"loss/fm": 1.0 + i}))
            arts["dmd"] = _art(study, "dmd", row)
            _metrics(arts["dmd"], _curve("dmd", (10, 20, 30), {"loss/dm": 0.2 * i, "loss/fake": 0.8, "loss/rec": 0.6,
                                                               "match/swd": 1.5 + 0.1 * i}))
            arts["refine"] = _art(study, "refine", row)
            _metrics(arts["refine"], _curve("refine", (10, 20), {"loss/rec": 0.5}))
        ev = {"extractor": "lite0", "rfid_lite0": 300.0 + i, "gfid_lite0": 320.0 + i, "is_lite0": 1.2, "psnr": 8.0 + i,
              "gfid_samples": 64, "random_init": row == "dinov2"}
        manifest = {"row": row, "prior": row, "wall_s": 30.0 + i,
                    "config": {"run": {"name": "table1-smoke", "num_workers": 1, "use_gpu": False},
                               "eval": {"extractor": "lite0"}},
                    "summaries": {"eval": ev, **({"dmd": {"match/swd": 0.5}} if row != "vae" else {})},
                    "artifacts": {k: str(a.path.relative_to(study)) for k, a in arts.items()}}
        (study / "rows").mkdir(parents=True, exist_ok=True)
        (study / "rows" / f"{row}.json").write_text(json.dumps(manifest))
        records.append({"row": row, "prior": row, "rfid": ev["rfid_lite0"], "psnr": ev["psnr"], "gfid": ev["gfid_lite0"],
                        "is": 1.2, "extractor": "lite0", "gfid_samples": 64,
                        "matching_swd": None if row == "vae" else 0.5, "diversity": 0.1, "latent_diversity": 0.3,
                        "wall_s": 30.0 + i, "gpu_hours": 0.0, "random_init": row == "dinov2",
                        "trial_id": f"t{i}", "config": "{...}"})  # Tune bookkeeping the report drops
    pd.DataFrame.from_records(records).to_csv(study / "table1.csv", index=False)
    return study


def add_derived(study: Path) -> None:
    """Give the prior rows the manifest keys newer studies write: `derived` values and a seed."""
    for row, dm_weight in (("dinov2", 10.0), ("gaussian", 1.0)):
        path = study / "rows" / f"{row}.json"
        m = json.loads(path.read_text())
        m["derived"] = {"dm_weight": dm_weight, "cfg_scale": 1.5, "timestep_schedule": "anneal",
                        "tokenizer_kind": "ae", "score_net_size": [64, 128]}
        m["seed"] = 1
        path.write_text(json.dumps(m))


def _images(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def _px(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * report.DPI), round(inches[1] * report.DPI)


def _assert_png(path: Path, size: tuple[int, int] | None = None) -> None:
    assert path.stat().st_size > 1000, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert abs(im.size[0] - size[0]) <= 1 and abs(im.size[1] - size[1]) <= 1, (path.name, im.size, size)
            assert min(im.size) > 100
        else:
            assert min(im.size) > 50
        assert im.convert("L").getextrema()[0] < im.convert("L").getextrema()[1]  # not a blank image


STAGE_PANELS = {"tokenizer": 5, "teacher": 1, "dmd": 4, "refine": 1, "generator": 2}  # keys the fixture logs


def report_images() -> set[str]:
    """Every image the fixture's full report embeds, relative to the report folder."""
    return {"fig8_gfid_vs_step.png", "fig4_tsne.png", *(f"curves_{s}.png" for s in STAGE_PANELS),
            *(f"grids/{r}_{k}.png" for r in ROWS for k in ("samples", "reconstructions"))}


class _Page(HTMLParser):
    """The `<img src>` values and visible text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_from_results_folder(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    md_path = report.build_report(study, max_points=100)
    out = study / "report"
    assert md_path == out / "report.md"
    md = md_path.read_text()

    links = _images(md)
    assert set(links) == report_images() and len(links) == len(set(links))
    for rel in links:
        assert (out / rel).exists(), rel
    _assert_png(out / "fig8_gfid_vs_step.png", _px(report.CURVE_FIGSIZE))
    for stage, panels in STAGE_PANELS.items():
        _assert_png(out / f"curves_{stage}.png", _px(report.stage_figsize(panels)))
    _assert_png(out / "fig4_tsne.png", _px(report.tsne_figsize(len(ROWS))))
    _assert_png(out / "grids" / "vae_samples.png", (136, 136))
    _assert_png(out / "grids" / "dinov2_reconstructions.png", (136, 104))

    # header, random-init warning, the table (Tune's bookkeeping columns dropped), notes
    assert "# DMVAE study report: table1-smoke" in md and "preset: `smoke`" in md and "`lite0`" in md
    assert "Warning: random-init weights" in md and "`dinov2`" in md
    assert "| row " in md and "gFID-64" in md and "rFID" in md and "trial_id" not in md
    assert "No gFID curve logged for row(s) gaussian" in md
    assert "Row settings" not in md  # these manifests predate `derived`
    for stem_file in ("table1.md", "table1.tex", "table1.csv"):
        assert (out / stem_file).stat().st_size > 0
    assert "\\begin{tabular}" in (out / "table1.tex").read_text()

    # the HTML page: the same images, the table as an HTML table, no script, nothing fetched from elsewhere
    page = _Page((out / "report.html").read_text())
    assert page.images == links
    assert "table" in page.tags and "script" not in page.tags
    text = " ".join(page.text)
    assert "gFID-64" in text and "DMVAE study report: table1-smoke" in text and "trial_id" not in text
    assert "Warning: random-init weights." in text and "No gFID curve logged for row(s) gaussian" in text
    assert "http:" not in (out / "report.html").read_text() and "https:" not in (out / "report.html").read_text()


def test_stage_curves_merge_rows_sharing_an_artifact(tmp_path: Path) -> None:
    study = report.load_study(make_study(tmp_path))
    tok = report.stage_curves(study, "tokenizer")
    assert [c.label for c in tok] == ["vae (baseline)", "dinov2, gaussian"]  # DMVAE rows share the AE pretrain
    assert tok[0].has("loss/kl") and not tok[1].has("loss/kl") and not tok[0].has("loss/lpips")
    assert [c.rows for c in report.stage_curves(study, "dmd")] == [["dinov2"], ["gaussian"]]
    assert report.stage_curves(study, "nonexistent") == []


def test_derived_values_and_seeds_make_a_row_settings_table(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    add_derived(study)
    settings = report.row_settings(report.load_study(study))
    assert settings is not None and settings["row"].tolist() == list(ROWS)
    assert list(settings.columns) == ["row", "seed", "dm_weight", "cfg_scale", "timestep_schedule", "tokenizer_kind",
                                      "score_net_size", "dmd_drop_path"]
    assert settings.loc[1, "dm_weight"] == 10.0 and settings.loc[1, "seed"] == 1
    assert settings.loc[2, "score_net_size"] == "[64,128]"
    assert settings["dmd_drop_path"].tolist() == [None, 0.0, 0.0]  # vae has no DMD; no Lite0 encoder here
    md = report.build_report(study, max_points=0).read_text()
    assert "## Row settings" in md and "| dinov2 " in md and "anneal" in md
    assert "stochastic depth in DMD" not in md
    # a Lite0 DMVAE row written before dmd.encoder_drop_path existed ran with the package's drop connect, 0.2
    path = study / "rows" / "gaussian.json"
    m = json.loads(path.read_text())
    m["config"]["tokenizer"] = {"backbone": "efficientnet_lite0"}
    path.write_text(json.dumps(m))
    assert report.row_settings(report.load_study(study))["dmd_drop_path"].tolist() == [None, 0.0, 0.2]
    m["config"]["dmd"] = {"encoder_drop_path": 0.0}  # recorded: what the row ran with
    path.write_text(json.dumps(m))
    assert report.row_settings(report.load_study(study))["dmd_drop_path"].tolist() == [None, 0.0, 0.0]
    m["config"]["dmd"] = {}
    path.write_text(json.dumps(m))
    md = report.build_report(study, max_points=0).read_text()
    assert "stochastic depth in DMD.** Row(s) `gaussian` trained their encoder in DMD with drop connect 0.2" in md
    from dmvae_study.report.study import drop_path_notice  # the frontier page counts instead of naming
    assert "** 1 of the 2 rows with a DMD stage trained" in drop_path_notice(
        list(report.load_study(study).rows.values()), name_rows=False)
    text = " ".join(_Page((study / "report" / "report.html").read_text()).text)
    assert "Row settings" in text and "anneal" in text and "[64,128]" in text and "–" in text  # vae: none derived


def test_rebuilds_table_from_manifests_and_falls_back_to_loss(tmp_path: Path) -> None:
    study = make_study(tmp_path, curves=False)
    (study / "table1.csv").unlink()
    out = tmp_path / "elsewhere"
    assert report.main([str(study), "--out", str(out), "--max-points", "0"]) == 0
    md = (out / "report.md").read_text()
    assert "rebuilt from rows/*.json" in md
    assert "fig8_fm_loss_vs_step.png" in _images(md) and "fig4_tsne.png" not in md
    _assert_png(out / "fig8_fm_loss_vs_step.png", _px(report.CURVE_FIGSIZE))
    table = pd.read_csv(out / "table1.csv")
    assert table["row"].tolist() == list(ROWS)
    assert table.loc[table["row"] == "gaussian", "gfid"].item() == pytest.approx(322.0)
    assert table.loc[table["row"] == "vae", "wall_s"].item() == pytest.approx(30.0)


def test_read_metrics_keeps_last_of_repeated_steps(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    df = report.read_metrics(study / "store" / "generator" / "generator-vae" / "metrics.jsonl")
    assert df["step"].tolist() == [10, 20, 30, 40]


def test_missing_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "no study folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="row manifests"):
        report.build_report(tmp_path / "empty")


def test_random_init_flag_reads_text_and_ignores_missing() -> None:
    df = pd.DataFrame({"row": ["a", "b", "c", "d"], "random_init": [True, "False", None, "True"]})
    assert report.random_init_rows(df) == ["a", "d"]


def test_manifest_records_win_over_a_stale_study_table(tmp_path: Path) -> None:
    """An interrupted run can leave a table listing finished rows as failed; the rows' manifests hold their
    records, and those are what the report shows (a row failed in the table with no record stays failed)."""
    study = make_study(tmp_path, curves=False)
    for row, gfid in (("vae", 82.5), ("dinov2", 65.5)):
        path = study / "rows" / f"{row}.json"
        m = json.loads(path.read_text())
        m["record"] = {"row": row, "prior": row, "seed": 0, "rfid": 40.0, "psnr": 26.0, "gfid": gfid,
                       "extractor": "lite0", "status": "ok"}
        path.write_text(json.dumps(m))
    stale = pd.DataFrame({"row": ["vae", "dinov2", "gaussian"], "prior": ["vae", "dinov2", "gaussian"],
                          "status": ["failed"] * 3, "error": [None] * 3})
    stale.to_csv(study / "table1.csv", index=False)
    out = tmp_path / "rep"
    assert report.main([str(study), "--out", str(out), "--max-points", "0"]) == 0
    table = pd.read_csv(out / "table1.csv").set_index("row")
    assert table.index.tolist() == ["vae", "dinov2", "gaussian"]
    assert table.loc["vae", "gfid"] == pytest.approx(82.5) and table.loc["dinov2", "gfid"] == pytest.approx(65.5)
    assert table.loc["gaussian", "status"] == "failed"
    assert "holds 0 finished row(s)" in (out / "report.md").read_text()


def test_seeded_rows_share_a_colour_and_fig8_draws_their_mean(tmp_path: Path) -> None:
    """Rows `<row>-s<k>`: one colour per row in every figure, Fig. 8 the seeds' mean with a -+ sd band
    (checked against a direct computation), and the t-SNE one seed per row."""
    from matplotlib.figure import Figure

    from dmvae_study.report.curves import _draw_seed_means, _seed_groups, row_styles, stage_curves
    from dmvae_study.report.study import load_study
    from dmvae_study.report.tsne import _one_seed_per_row
    study_dir = make_study(tmp_path)
    (study_dir / "table1.csv").unlink()
    for row in ("vae", "dinov2"):  # seed 1 of two rows: a copy of seed 0's manifest with its own curve
        m = json.loads((study_dir / "rows" / f"{row}.json").read_text())
        art = _art(study_dir, "generator", f"{row}-s1")
        _metrics(art, [{"stage": "generator", "step": s, "eval/gfid_curve": 100.0 + s} for s in (10, 20, 30, 40)])
        m1 = {**m, "row": f"{row}-s1", "artifacts": {**m["artifacts"], "generator": str(art.path.relative_to(study_dir))}}
        (study_dir / "rows" / f"{row}-s1.json").write_text(json.dumps(m1))
        (study_dir / "rows" / f"{row}.json").rename(study_dir / "rows" / f"{row}-s0.json")
        m0 = json.loads((study_dir / "rows" / f"{row}-s0.json").read_text())
        (study_dir / "rows" / f"{row}-s0.json").write_text(json.dumps({**m0, "row": f"{row}-s0"}))
    study = load_study(study_dir)
    styles = row_styles(study.ordered_rows())
    assert styles["vae-s0"] == styles["vae-s1"] and styles["dinov2-s0"]["color"] == styles["dinov2-s1"]["color"]
    assert styles["vae-s0"]["color"] != styles["dinov2-s0"]["color"]
    assert [r.name for r in _one_seed_per_row(study)] == ["vae-s0", "dinov2-s0", "gaussian"]
    groups = _seed_groups([c for c in stage_curves(study, "generator") if c.has("eval/gfid_curve")])
    assert sorted(groups) == ["dinov2", "vae"] and all(len(g) == 2 for g in groups.values())
    ax = Figure().add_subplot()
    _draw_seed_means(ax, groups, "eval/gfid_curve")
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("vae"))
    s0 = {s: 300.0 - 2 * s for s in (10, 20, 30, 40)}  # make_study's vae curve (row 0); seed 1's: 100 + s
    assert list(line.get_xdata()) == [10, 20, 30, 40]
    assert list(line.get_ydata()) == pytest.approx([(s0[s] + 100.0 + s) / 2 for s in (10, 20, 30, 40)])
    assert line.get_label() == "vae (baseline): mean of 2 seeds"


def test_seed_section_resolves_each_metric_against_welch(tmp_path: Path) -> None:
    """gFID, rFID and PSNR pairs (a - b) with Welch and paired-by-seed intervals equal to a direct scipy
    computation."""
    from scipy import stats as sps

    from dmvae_study.report.build import _seed_sections
    from dmvae_study.report.study import Study
    vals = {"vae": ([82.3, 80.1, 84.0], [47.4, 49.0, 45.2], [26.6, 26.1, 26.4]),
            "dinov2": ([65.5, 66.9, 64.2], [59.4, 57.0, 61.1], [23.4, 23.9, 23.1])}
    table = pd.DataFrame.from_records([{"row": f"{r}-s{k}", "gfid": g[k], "rfid": f[k], "psnr": p[k], "status": "ok"}
                                       for r, (g, f, p) in vals.items() for k in range(3)])
    sections = _seed_sections(Study(root=tmp_path, stem="table1", table=table, rows={}, notes=[]), tmp_path)
    assert len(sections) == 1
    for metric, i, file in (("gfid", 0, "pairs.csv"), ("rfid", 1, "pairs_rfid.csv"), ("psnr", 2, "pairs_psnr.csv")):
        got = pd.read_csv(tmp_path / file).iloc[0]
        assert (got["a"], got["b"]) == ("dinov2", "vae")  # the semantic row first
        a, b = np.array(vals["dinov2"][i]), np.array(vals["vae"][i])
        ci = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
        assert got["diff"] == pytest.approx(a.mean() - b.mean())
        assert (got["lo"], got["hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert bool(got["resolved"]) == (ci.low > 0 or ci.high < 0)
        ci = sps.ttest_rel(a, b).confidence_interval(0.95)  # paired by seed (s0 with s0, ...)
        assert got["paired_seeds"] == 3 and got["paired_diff"] == pytest.approx((a - b).mean())
        assert (got["paired_lo"], got["paired_hi"]) == pytest.approx((ci.low, ci.high), rel=1e-9)
        assert bool(got["paired_resolved"]) == (ci.low > 0 or ci.high < 0)


def test_mean_interval_and_seed_labels_match_scipy_and_the_label_grammar() -> None:
    """`stats.mean_interval` (shared by the seed summary, the paired differences and the held-out picks)
    equals scipy's Student-t interval; one value has no interval, none no mean. `seed_of` reads
    `<row>-s<seed>` and nothing else."""
    from scipy import stats as sps

    from dmvae_study.report.stats import mean_interval, seed_of
    v = np.array([61.6, 58.3, 64.9, 60.2])
    for level in (0.9, 0.95):
        lo, hi = sps.t.interval(level, len(v) - 1, loc=v.mean(), scale=sps.sem(v))
        assert mean_interval(v, level) == pytest.approx((v.mean(), lo, hi), rel=1e-12)
    mean, lo, hi = mean_interval([3.0])
    assert mean == 3.0 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in mean_interval([]))
    assert [seed_of(x) for x in ("gmm@dm=1-s2", "vae-s10", "vae", "vae-s", "vae-sx")] == [2, 10, None, None, None]


def test_report_is_rebuilt_from_row_archives_after_the_store_is_gone(tmp_path: Path) -> None:
    """`rows/<row>/` keeps each row's curves, grids and t-SNE inputs: with the artifact store deleted, the
    report draws the same figures and grids; rows sharing a stage's artifact still make one curve."""
    study = make_study(tmp_path)
    assert archive_study(study) == sorted(ROWS)
    assert archive_study(study) == []  # archived rows are skipped (`force` rewrites them)
    z = torch.load(study / "store" / "latents" / "latents-dinov2" / "latents.pt", weights_only=True)
    with np.load(study / "rows" / "dinov2" / "tsne.npz") as d:
        idx = report.select(z["y"], len(z["y"]), 1000, seed=0)  # the archive keeps a seed-0 subsample: here every point
        assert len(idx) == len(z["y"])
        np.testing.assert_array_equal(d["latents"], z["z"][idx].reshape(len(idx), -1).numpy())  # 16 dims: no PCA
        np.testing.assert_array_equal(d["latents_y"], z["y"][idx].numpy())
        assert int(d["latents_count"]) == len(z["y"]) and str(d["reference_label"]) == "class"
    with np.load(study / "rows" / "gaussian" / "tsne.npz") as d:
        assert "reference_y" not in d and str(d["reference_label"]) == "component"
    with np.load(study / "rows" / "vae" / "tsne.npz") as d:
        assert "reference" not in d  # a baseline has no reference set

    shutil.rmtree(study / "store")
    md = report.build_report(study, max_points=100).read_text()
    assert set(_images(md)) == report_images()
    assert "no latent cache" not in md and "no reference set" not in md and "no eval image grids" not in md
    _assert_png(study / "report" / "fig4_tsne.png", _px(report.tsne_figsize(len(ROWS))))
    loaded = report.load_study(study)
    assert [c.label for c in report.stage_curves(loaded, "tokenizer")] == ["vae (baseline)", "dinov2, gaussian"]
    assert report.stage_curves(loaded, "generator")[1].log["step"].tolist() == [10, 20, 30, 40]


def test_pca_points_keep_the_distances_of_points_spanning_fifty_dims() -> None:
    """Archived t-SNE inputs are PCA'd to 50 dims: for points in a 50-dim subspace of 64 dims that is a
    rotation, so every pairwise distance is kept (float64 reference: the distances of the raw points)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 50, generator=g, dtype=torch.float64))[0]
    x = torch.randn(200, 50, generator=g, dtype=torch.float64) @ basis.T + 3.0
    f = report.pca_points(x.reshape(200, 4, 4, 4))
    assert f.shape == (200, 50)
    def dist(a: np.ndarray) -> np.ndarray:
        return np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dist(f), dist(x.numpy()), atol=1e-9)


def test_a_row_whose_archive_fails_keeps_its_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from dmvae_study.pipeline import artifact, resolve
    from dmvae_study.presets import preset
    from dmvae_study.report import archive
    from trainers.launch import write_manifest
    cfg = resolve(preset("smoke", [f"run.out_dir={tmp_path}", "prior.name=gaussian"]))
    artifact(cfg, "eval").path.mkdir(parents=True)

    def broken(*_: object) -> None:
        raise OSError("disk full")
    monkeypatch.setattr(archive, "archive_row", broken)
    with caplog.at_level("WARNING", logger="dmvae_study"):
        path = write_manifest(cfg, "gaussian", {}, 1.0)
    assert json.loads(path.read_text())["row"] == "gaussian"
    assert "rows/gaussian/ was not written (OSError: disk full)" in caplog.text
    assert "python -m dmvae_study.report.archive" in caplog.text


def test_header_names_the_study_folder_relative_to_the_working_directory(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A report committed with its study (`docs/mini/report`) names no machine's absolute path."""
    study = make_study(tmp_path)
    monkeypatch.chdir(tmp_path)
    md = report.build_report("table1-smoke", max_points=0).read_text()
    assert "source: `table1-smoke`" in md
    monkeypatch.chdir(study / "rows")  # outside the study folder's tree: absolute
    md = report.build_report(study, max_points=0).read_text()
    assert f"source: `{study.resolve()}`" in md
