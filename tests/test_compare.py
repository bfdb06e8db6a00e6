"""`python -m dmvae_study.report.compare`: after - before of two study folders, paired by seed, checked against
scipy's paired t-test interval; the settings that changed; a reused row marked as the same computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dmvae_study.report import compare as cmp
from dmvae_study.report.study import load_study

SEEDS = (0, 1, 2)


def write_study(root: Path, gfid: dict[str, list[float]], psnr: dict[str, list[float]], drop_path: float | None,
                out_dir: str, scales: tuple[float, ...] = (1.0, 1.1, 1.2)) -> Path:
    """A folder of committed parts (`rows/<row>-s<seed>.json` only, as docs/mini holds): a baseline whose eval
    artifact both studies share (reused) and a DMVAE row whose DMD setting differs."""
    (root / "rows").mkdir(parents=True)
    for row in gfid:
        for i, s in enumerate(SEEDS):
            dmd = {"dm_weight": 1.0} | ({} if drop_path is None else {"encoder_drop_path": drop_path})
            config = {"run": {"seed": s, "out_dir": out_dir}, "tokenizer": {"backbone": "efficientnet_lite0"},
                      **({"dmd": dmd} if row != "vae" else {})}
            ev = f"eval-{row}-{s}" if row == "vae" else f"eval-{row}-{s}-{drop_path}"
            arts = {"eval": f"store/eval/{ev}", "tokenizer": f"store/tokenizer/tokenizer-{row if row == 'vae' else 'ae'}-{s}",
                    **({"dmd": f"store/dmd/dmd-{s}-{drop_path}", "reference": f"store/reference/ref-{row}-{s}"}
                       if row != "vae" else {})}
            summaries = {"tokenizer": {"latent_mean": 0.0, "latent_scale": 2.0 if row == "vae" else scales[i]}}
            label = f"{row}-s{s}"
            record = {"row": label, "prior": row, "seed": s, "gfid": gfid[row][i], "psnr": psnr[row][i],
                      "rfid": 50.0, "status": "ok"}
            (root / "rows" / f"{label}.json").write_text(json.dumps(
                {"row": label, "prior": row, "seed": s, "config": config, "summaries": summaries, "artifacts": arts,
                 "record": record}))
    return root


@pytest.fixture()
def studies(tmp_path: Path) -> tuple[Path, Path, dict]:
    rng = np.random.default_rng(0)
    vae_g, vae_p = list(rng.normal(84, 3, 3)), list(rng.normal(26.5, 0.4, 3))
    before_g, before_p = list(rng.normal(64, 3, 3)), list(rng.normal(23.7, 0.3, 3))
    after_g = [g + d for g, d in zip(before_g, (0.5, 0.9, 0.7))]  # shifted consistently: resolved
    after_p = [p + d for p, d in zip(before_p, (0.4, -0.9, 0.3))]  # inconsistent: not resolved
    before = write_study(tmp_path / "before", {"vae": vae_g, "gaussian": before_g}, {"vae": vae_p, "gaussian": before_p},
                         None, "/machine/a")
    after = write_study(tmp_path / "after", {"vae": vae_g, "gaussian": after_g}, {"vae": vae_p, "gaussian": after_p},
                        0.0, "/machine/b", scales=(1.0, 1.15, 1.2))  # seed 1's shared tokenizer was retrained
    return before, after, {"gfid": (before_g, after_g), "psnr": (before_p, after_p)}


def test_paired_differences_match_scipy_and_name_what_changed(studies) -> None:
    before, after, values = studies
    table = cmp.compare(load_study(before), load_study(after), ("gfid", "psnr")).set_index("row")
    g = table.loc["gaussian"]
    assert g["seeds"] == 3 and not g["same"]
    for m, (b, a) in values.items():
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert g[f"{m}_diff"] == pytest.approx(np.mean(np.subtract(a, b)), abs=1e-12)
        assert (g[f"{m}_lo"], g[f"{m}_hi"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert g[f"{m}_before"] == pytest.approx(np.mean(b)) and g[f"{m}_after"] == pytest.approx(np.mean(a))
    assert g["gfid_resolved"] and not g["psnr_resolved"]
    # the setting the before manifests lack, not the machine path (run.out_dir does not change results)
    assert g["changed"] == "dmd.encoder_drop_path: (not recorded) -> 0.0"
    assert g["weights_differ"] == "s1: tokenizer"  # same key, other weights: the pair carries its noise too
    v = table.loc["vae"]
    assert v["same"] and v["gfid_diff"] == 0.0 and v["changed"] == "" and v["weights_differ"] == ""


def test_rows_of_one_seed_on_different_weights_under_one_key_are_named(tmp_path: Path) -> None:
    """`shared_weights_notice`: DMVAE rows of one seed share the tokenizer artifact key; one retrained with other
    weights (a lost store, another machine) is named, by the fingerprint when recorded, else its latent stats."""
    from dmvae_study.report.study import load_manifests, shared_weights_notice
    g = {"gaussian": [60.0, 61.0, 62.0], "gmm": [58.0, 59.0, 60.0], "vae": [84.0, 85.0, 86.0]}
    root = write_study(tmp_path / "s", g, {k: [23.0] * 3 for k in g}, 0.0, "/m")
    assert shared_weights_notice(list(load_manifests(root).values())) is None
    m = json.loads((root / "rows" / "gmm-s1.json").read_text())
    m["summaries"]["tokenizer"]["latent_scale"] = 1.05
    (root / "rows" / "gmm-s1.json").write_text(json.dumps(m))
    rows = list(load_manifests(root).values())
    text = shared_weights_notice(rows)
    assert "seed 1 (2 under `tokenizer-ae-1`): latent mean 0.0000, scale 1.1000 (`gaussian-s1`); " \
           "latent mean 0.0000, scale 1.0500 (`gmm-s1`)" in text
    assert "seed 0" not in text and "vae" not in text  # a baseline trains its own tokenizer
    assert "(1 row); " in shared_weights_notice(rows, name_rows=False)
    m["summaries"]["tokenizer"]["fingerprint"] = "abc123"
    (root / "rows" / "gmm-s1.json").write_text(json.dumps(m))
    assert "abc123 (`gmm-s1`)" in shared_weights_notice(list(load_manifests(root).values()))


def test_cli_prints_the_table_and_writes_csv(studies, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before, after, _ = studies
    out = tmp_path / "cmp.csv"
    assert cmp.main([str(before), str(after), "--metrics", "gfid,psnr", "--per-seed", "--csv", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| vae | 3 |" in text and "(same computation)" in text
    assert "**resolved**" in text.split("| gaussian |")[1].split("\n")[0]
    assert "- gaussian: `dmd.encoder_drop_path: (not recorded) -> 0.0`" in text
    assert "| gaussian-s2 |" in text
    assert sorted(pd.read_csv(out)["row"]) == ["gaussian", "vae"]
    assert cmp.main([str(before), str(after), "--rows", "gaussian"]) == 0
    assert "| vae |" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["{b}", "{t}/missing"], "no study folder"),
    (["{b}", "{a}", "--metrics", "fid"], "unknown metric(s) fid; choose from"),
    (["{b}", "{a}", "--rows", "dinov2"], "share no row among dinov2"),
])
def test_bad_input_is_refused_with_the_fix(studies, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    before, after, _ = studies
    args = [a.format(b=before, a=after, t=tmp_path) for a in argv]
    assert cmp.main(args) == 2
    assert message in capsys.readouterr().err


def test_changed_settings_name_the_precision_computed_not_its_spelling() -> None:
    """`auto` on CPU workers and `fp32` are one computation; `bf16` is another (it enters the artifact key)."""
    from types import SimpleNamespace

    def row(**run):
        return SimpleNamespace(config={"run": {"out_dir": "x", **run}, "dmd": {"dm_weight": 1.0}})
    assert cmp.changed_settings(row(precision="auto"), row(precision="fp32", out_dir="y")) == {}
    assert cmp.changed_settings(row(precision="auto"), row(precision="bf16")) == {"run.precision": ("fp32", "bf16")}
    assert cmp.changed_settings(row(precision="auto", use_gpu=True), row(precision="bf16", use_gpu=True)) == {}
