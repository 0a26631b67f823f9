from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, TrainConfig, apply_override, load_config, parse_cli

CONFIGS = Path(__file__).parents[2] / "train" / "configs"


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  max_steps: 7\nparts:\n  unet: {mode: full, lr: 2.0e-5}\n")
    cfg = load_config(f, ["optim.batch_size=3", "parts.vlm.mode=frozen", "data.shards=a.tar,b.tar"])
    assert cfg.optim.max_steps == 7 and cfg.optim.batch_size == 3
    assert cfg.parts.unet.mode == "full" and cfg.parts.unet.lr == 2e-5
    assert cfg.parts.vlm.mode == "frozen"
    assert cfg.data.shards == ["a.tar", "b.tar"]
    # Defaults are the paper's Table 1.
    d = TrainConfig().parts
    assert (d.vision.mode, d.vlm.mode, d.vlm.rank, d.vlm.lr) == ("frozen", "lora", 8, 3e-6)
    assert (d.connector.mode, d.connector.lr, d.unet.mode, d.unet.rank, d.unet.lr) == (
        "full",
        1e-5,
        "lora",
        8,
        5e-6,
    )


def test_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('out_dir = "x"\n[optim]\nlr_unused = 1\n')
    with pytest.raises(ConfigError, match="optim.lr_unused"):
        load_config(f)
    f.write_text('out_dir = "x"\n[data]\nstage = 2\n')
    assert load_config(f).data.stage == 2


@pytest.mark.parametrize(
    "item, match",
    [
        ("optim.lr=1", "unknown config key 'optim.lr'"),
        ("optim.max_steps=ten", "must be an integer"),
        ("parts.unet.mode=half", "not one of"),
        ("data.stage=3", "not one of"),
        ("optim", "must look like"),
        ("parts.unet=full", "is a section"),
        ("logging.tensorboard=maybe", "true or false"),
    ],
)
def test_bad_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_override(TrainConfig(), item)


def test_cli_forms():
    path, ov = parse_cli(
        ["--config", "a.yaml", "--set", "optim.seed=1", "data.stage=2", "--optim.batch_size", "4"]
    )
    assert path == "a.yaml" and ov == ["optim.seed=1", "data.stage=2", "optim.batch_size=4"]
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_cli(["--lr", "1"])


def test_validate_names_problems():
    cfg = TrainConfig()
    cfg.diffusion.cond_dropout = 1.5
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    for key in ("model.vlm", "model.sdxl", "data.shards", "diffusion.cond_dropout"):
        assert key in str(e.value)


@pytest.mark.parametrize(
    "name", ["tiny.yaml", "mini.yaml", "mini_scratch.yaml", "stage1.yaml", "stage2.yaml"]
)
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name, ["model.vlm=v", "model.sdxl=s", "data.shards=x.tar"])
    cfg.validate()
    if name.startswith("stage"):
        assert cfg.model.preset == "real" and cfg.data.stage == int(name[5])
    if name == "stage2.yaml":
        assert cfg.model.init_bundle, "stage 2 starts from stage 1's bundle"
    if name == "mini_scratch.yaml":
        assert all(getattr(cfg.parts, p).mode == "full" for p in ("vlm", "connector", "unet"))
        assert cfg.diffusion.ema
    if name in ("mini.yaml", "stage1.yaml"):  # Table 1's structure: what trains and how
        p = cfg.parts
        assert p.vision.mode == "frozen" and p.connector.mode == "full"
        assert (p.vlm.mode, p.vlm.rank, p.unet.mode, p.unet.rank) == ("lora", 8, "lora", 8)
        assert p.connector.lr > p.unet.lr > p.vlm.lr  # Table 1: 1e-5 > 5e-6 > 3e-6
