"""Every shipped config file and every preset loads and validates; bad values name their field."""

from pathlib import Path

import pytest

from rcn_dist.config import PRESETS, ConfigError, apply_overrides, load_file, preset, resolve
from rcn_dist.model import describe

DEEPSPEED_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "zero_optimization", "optimizer",
                  "bf16", "fp16", "gradient_accumulation_steps"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_every_config_file_loads_and_builds():
    files = sorted([*CONFIGS.glob("*.json"), *CONFIGS.glob("*.toml")])
    for f in files:
        if DEEPSPEED_KEYS & set(load_file(f)):
            continue  # DeepSpeed's own JSON: read by the engine, not a Config file
        cfg = resolve(file=f)
        assert describe(cfg.model)["params"] > 0, f


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds(name):
    cfg = preset(name)
    assert cfg.name == name
    d = describe(cfg.model)  # builds the model on the meta device: shapes must fit together
    assert d["params"] > 0 and d["enc_primary_caps"] > 0 and d["dec_primary_caps"] > 0
    assert resolve(preset_name=name).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override,field", [
    ("model.T=-1", "model.T"),
    ("model.T=0", "model.T"),
    ("model.enc_conv_kernel=15", "model.enc_conv_kernel"),
    ("model.enc_primary_kernel=25", "model.enc_primary_kernel"),
    ("model.dec_primary_kernel=40", "model.dec_primary_kernel"),
    ("model.read_n=40", "model.read_n"),
    ("model.rnn=transformer", "model.rnn"),
    ("model.likelihood=gaussian", "model.likelihood"),
    ("model.m_minus=0.95", "model.m_plus"),
    ("model.margin_weight=-1", "model.margin_weight"),
    ("model.T=abc", "model.T"),
    ("model.colour=1", "model.colour"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(preset("tiny"), [override])


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve(preset_name="nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('preset = "tiny"\n[model]\nT = -3\n')
    with pytest.raises(ConfigError, match=r"model\.T"):
        resolve(file=bad)
    good = tmp_path / "good.toml"
    good.write_text('preset = "tiny"\n[model]\nT = 6\nenc_conv_channels = [8, 8]\n')
    cfg = resolve(file=good, overrides=["model.z_dim=5"])
    assert (cfg.model.T, cfg.model.enc_conv_channels, cfg.model.z_dim) == (6, (8, 8), 5)
