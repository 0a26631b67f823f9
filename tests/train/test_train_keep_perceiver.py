"""``model.keep_perceiver``: typed key, wired through build_model, recorded in the exported bundle."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mumu_core.encoder import PerceiverRemoved
from train.config import ConfigError, load_config
from train.loop import run
from train.model import build_model

CONFIGS = Path(__file__).parents[2] / "train" / "configs"


def tiny_cfg(tiny_models, shards, out: Path, *extra: str):
    return load_config(
        CONFIGS / "tiny.yaml",
        [
            f"model.vlm={tiny_models.vlm}",
            f"model.sdxl={tiny_models.sdxl}",
            f"data.shards={','.join(shards)}",
            f"out_dir={out}",
            *extra,
        ],
    )


def test_config_key_is_typed():
    assert load_config(None, []).model.keep_perceiver is False
    assert load_config(None, ["model.keep_perceiver=true"]).model.keep_perceiver is True
    with pytest.raises(ConfigError, match="model.keep_perceiver"):
        load_config(None, ["model.keep_perceiver=maybe"])


def test_kept_perceiver_trains_table1_structure_and_lands_in_the_bundle(tiny_models, shards, tmp_path):
    from mumu_core.bundle import load_bundle, load_conditioner
    from mumu_core.presets import TINY

    cfg = tiny_cfg(
        tiny_models, shards, tmp_path / "run", "optim.max_steps=1", "checkpoint.every=1",
        "model.keep_perceiver=true",
    )  # fmt: skip
    built = build_model(cfg, TINY, torch.device("cpu"))
    enc = built.model.encoder
    assert enc.keep_perceiver
    assert not isinstance(enc.vlm.connector.perceiver_resampler, PerceiverRemoved)
    perceiver = [p for n, p in built.model.named_parameters() if "perceiver_resampler" in n]
    # Under Table 1's LoRA structure the perceiver is not a LoRA target: it stays frozen, like the ViT.
    assert perceiver and not any(p.requires_grad for p in perceiver)

    run(cfg)
    bundle = load_bundle(tmp_path / "run" / "export" / "step_00000001" / "mumu.safetensors")
    assert bundle.meta.keep_perceiver is True
    cond = load_conditioner(tiny_models.vlm, bundle)
    assert cond.encoder.keep_perceiver

    plain = build_model(tiny_cfg(tiny_models, shards, tmp_path / "plain"), TINY, torch.device("cpu"))
    assert isinstance(plain.model.encoder.vlm.connector.perceiver_resampler, PerceiverRemoved)
