"""Typed configs: strict loading, dotted overrides, presets, YAML round trip."""

import pytest

from dmvae_study.config import DMDConfig, ExperimentConfig
from dmvae_study.presets import PRESETS, preset
from dmvae_study.configlib import ConfigError, apply_overrides, dump_yaml, load_yaml


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"dmd\.dm_wieght"):
        ExperimentConfig.from_dict({"dmd": {"dm_wieght": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key bogus"):
        ExperimentConfig.from_dict({"bogus": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"dmd\.dm_weight.*expected float"):
        ExperimentConfig.from_dict({"dmd": {"dm_weight": "ten"}})
    with pytest.raises(ConfigError, match=r"teacher\.total_steps"):
        ExperimentConfig.from_dict({"teacher": {"total_steps": 1.5}})
    with pytest.raises(ConfigError, match=r"run\.use_gpu"):
        ExperimentConfig.from_dict({"run": {"use_gpu": "yes"}})


def test_invalid_values_are_rejected_on_construction():
    with pytest.raises(ConfigError, match="size"):
        ExperimentConfig.from_dict({"teacher": {"size": "XXL"}})
    with pytest.raises(ConfigError, match="cfg_scale"):
        DMDConfig(cfg_scale=0.5)
    with pytest.raises(ConfigError, match="must be a multiple of run.num_workers=3"):
        preset("smoke", ["run.num_workers=3"])


def test_dotted_overrides_and_yaml_roundtrip(tmp_path):
    cfg = preset("smoke", ["dmd.dm_weight=20", "dmd.timestep_schedule=anneal", "prior.classes=[1, 2]"])
    assert cfg.dmd.dm_weight == 20.0 and isinstance(cfg.dmd.dm_weight, float)
    assert cfg.dmd.timestep_schedule == "anneal" and cfg.prior.classes == (1, 2)
    with pytest.raises(ConfigError, match="dmd.nope"):
        apply_overrides(cfg, ["dmd.nope=1"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    again = load_yaml(ExperimentConfig, path)
    assert again == cfg and again.digest() == cfg.digest()
    assert cfg.digest() != preset("smoke").digest()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_and_document_every_field(name):
    cfg = preset(name)
    assert isinstance(cfg, ExperimentConfig)
    for section in ("data", "tokenizer", "prior", "teacher", "dmd", "refine", "generator", "eval", "run"):
        text = type(getattr(cfg, section)).describe()
        assert all(len(line.split()) > 3 for line in text.splitlines()), f"{section} has an undocumented field"


def test_paper_setting():
    cfg = preset("imagenet256")
    assert cfg.data.resolution == 256 and cfg.tokenizer.latent_channels == 32
    assert cfg.tokenizer.backbone == "dinov2_vitl14" and cfg.tokenizer.backbone_patch == 16
    assert cfg.teacher.size == "L" and cfg.generator.size == "L"
    assert cfg.dmd.total_steps == 300_000 and cfg.dmd.batch_size == 256 and cfg.dmd.vae_every == 5
