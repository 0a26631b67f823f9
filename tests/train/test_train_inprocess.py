"""Single-process runs inside pytest (a 1-rank gloo group, the same FSDP2 path as torchrun)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.loop import NonFiniteLoss, run
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


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


@pytest.mark.parametrize("frozen_dtype", ["fp32", "bf16"])
def test_only_intended_parameters_change_and_bundle_loads(tiny_models, shards, tmp_path, frozen_dtype):
    from mumu_core.bundle import apply_unet_lora, load_bundle, load_conditioner
    from mumu_core.presets import TINY
    from mumu_core.prompt import InterleavedPrompt
    from mumu_core.sdxl import load_sdxl

    cfg = tiny_cfg(
        tiny_models, shards, tmp_path / "run", "optim.max_steps=2", "checkpoint.every=2",
        f"model.frozen_dtype={frozen_dtype}",
    )  # fmt: skip
    trained: dict[str, torch.Tensor] = {}
    run(cfg, inspect=lambda built: trained.update({n: full(p) for n, p in built.model.named_parameters()}))
    frozen_want = torch.bfloat16 if frozen_dtype == "bf16" else torch.float32
    lora_dtypes = {v.dtype for n, v in trained.items() if "lora_" in n or n.startswith("connector.")}
    assert lora_dtypes == {torch.float32}, "trainable parameters keep fp32 masters"
    assert trained["unet.conv_in.weight"].dtype == frozen_want

    fresh = build_model(cfg, TINY, torch.device("cpu")).model  # the run's starting point (same seed)
    start = dict(fresh.named_parameters())
    assert set(start) == set(trained)
    changed = {n for n in trained if not torch.equal(trained[n], start[n].detach())}
    vision = {n for n in trained if n.startswith("encoder.vlm.vision_model.")}
    unet_base = {n for n in trained if n.startswith("unet.") and "lora_" not in n}
    vlm_base = {n for n in trained if n.startswith("encoder.") and "lora_" not in n}
    assert vision and not changed & vision, "the vision tower must stay bit-identical"
    assert unet_base and not changed & unet_base, "the base UNet must stay bit-identical"
    assert not changed & vlm_base, "the base LLM must stay bit-identical (it trains through LoRA)"
    for prefix in (
        "connector.",
        "unet.",
        "encoder.vlm.text_model.",
        "encoder.vlm.connector.modality_projection.",
    ):
        lora_or_all = {
            n for n in trained if n.startswith(prefix) and (prefix == "connector." or "lora_B" in n)
        }
        assert lora_or_all and lora_or_all <= changed, f"{prefix} did not train"

    out = tmp_path / "run" / "export" / "step_00000002"
    bundle = load_bundle(out / "mumu.safetensors")
    assert bundle.meta.vlm_lora["rank"] == 4 and bundle.meta.unet_lora["rank"] == 4
    assert bundle.meta.tokens_per_image == 4 and bundle.meta.prediction_type == "epsilon"
    for k, v in bundle.connector_state.items():
        assert torch.equal(v, trained["connector." + k])
    b_key = next(k for k in bundle.vlm_lora_state if "lora_B" in k)
    assert torch.equal(
        bundle.vlm_lora_state[b_key], trained["encoder.vlm." + b_key.replace("lora_B.", "lora_B.default.")]
    )
    conditioner = load_conditioner(tiny_models.vlm, bundle)
    from PIL import Image

    cond = conditioner.encode(
        [InterleavedPrompt.parse("a <image> man", [Image.new("RGB", (20, 30), "red")], 4)]
    )
    assert cond.context.shape[-1] == TINY.connector.context_dim and torch.isfinite(cond.context).all()
    unet = load_sdxl(tiny_models.sdxl, TINY).unet
    apply_unet_lora(unet, bundle)
    assert (out / "unet_lora_kohya.safetensors").is_file()
    assert (
        json.loads((tmp_path / "run" / "checkpoints" / "step_00000002" / "trainer.json").read_text())["step"]
        == 2
    )
    assert (tmp_path / "run" / "tb").is_dir()

    # python -m train export: the same bundle again, from the DCP checkpoint alone.
    from train.__main__ import main

    assert main(["export", str(tmp_path / "run"), "--dest", str(tmp_path / "again")]) == 0
    again = load_bundle(tmp_path / "again" / "mumu.safetensors")
    for a, b in (
        (bundle.connector_state, again.connector_state),
        (bundle.unet_lora_state, again.unet_lora_state),
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.meta == bundle.meta


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tiny_models, shards, tmp_path, monkeypatch):
    import train.loop as loop

    real = loop.training_loss
    calls = {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(loop, "training_loss", poisoned)
    cfg = tiny_cfg(tiny_models, shards, tmp_path / "run", "optim.max_steps=3", "checkpoint.every=1")
    with pytest.raises(NonFiniteLoss, match="step 2"):
        run(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000001"]
    assert (
        json.loads((tmp_path / "run" / "checkpoints" / "step_00000001" / "trainer.json").read_text())["step"]
        == 1
    )


def test_mini_full_training_ema_exports_loadable_folders(tmp_path, shards):
    """mini: every part full, v-prediction, EMA, pixel space; exports full VLM and SDXL folders."""
    from safetensors import safe_open

    from mumu_core.bundle import load_bundle
    from mumu_core.encoder import MumuEncoder
    from mumu_core.presets import MINI
    from mumu_core.sdxl import load_sdxl
    from mumu_core.testing import build_tiny_models

    mini = build_tiny_models(tmp_path / "mini_models", "mini")
    out = tmp_path / "run"
    cfg = load_config(
        CONFIGS / "mini_scratch.yaml",
        [
            f"model.vlm={mini.vlm}",
            f"model.sdxl={mini.sdxl}",
            f"data.shards={','.join(shards)}",
            f"out_dir={out}",
            "optim.max_steps=2",
            "optim.batch_size=2",
            "optim.warmup_steps=0",
            "checkpoint.every=2",
            "logging.sample_every=2",
            "logging.sample_count=2",
            "logging.sample_steps=2",
            "logging.progress=false",
        ],
    )
    got: dict[str, dict[str, torch.Tensor]] = {}

    def grab(built):
        got["raw"] = {n: full(p) for n, p in built.model.named_parameters()}
        got["ema"] = {n: full(t) for n, t in built.ema.items()}

    run(cfg, inspect=grab)
    assert got["ema"] and all(n in got["ema"] for n in got["raw"])  # every part trains
    differs = [n for n in got["ema"] if not torch.equal(got["ema"][n], got["raw"][n])]
    assert differs, "EMA weights should lag the raw weights"

    exp = out / "export" / "step_00000002"
    bundle = load_bundle(exp / "mumu.safetensors")
    assert bundle.meta.prediction_type == "v_prediction" and bundle.meta.negative_pooled == "keep"
    assert not bundle.vlm_lora_state and not bundle.unet_lora_state
    for k, v in bundle.connector_state.items():
        assert torch.equal(v, got["ema"]["connector." + k])  # exports carry the EMA weights

    def keys(folder):
        out = set()
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as s:
                out |= set(s.keys())
        return out

    assert keys(exp / "vlm") == keys(mini.vlm)  # perceiver / lm_head keys kept: loading is warning-free
    enc = MumuEncoder.from_pretrained(exp / "vlm")
    name = "text_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(dict(enc.vlm.named_parameters())[name], got["ema"]["encoder.vlm." + name])
    unet = load_sdxl(exp / "sdxl", MINI).unet
    name = "conv_in.weight"
    assert torch.equal(dict(unet.named_parameters())[name], got["ema"]["unet." + name])
    assert (out / "samples" / "step_00000002.png").is_file()


def test_stage2_starts_from_a_bundle(tiny_models, shards, tmp_path):
    """Stage 2 continues the bundle's connector and LoRAs (at the bundle's rank) on one person crop."""
    from mumu_core.bundle import load_bundle

    start = load_bundle(tiny_models.bundle)
    out = tmp_path / "run"
    cfg = tiny_cfg(
        tiny_models,
        shards,
        out,
        f"model.init_bundle={tiny_models.bundle}",
        "data.stage=2",
        "data.tokens_per_image=0",  # stage 2 default: 4x the preset's tokens (tiny: 16 = 4x4 patches)
        "data.max_images=1",
        "data.max_crops=1",
        "data.control_prob=0",
        "parts.vlm.rank=2",  # ignored in favour of the bundle's rank 4 (logged)
        "optim.max_steps=1",
        "checkpoint.every=1",
    )
    run(cfg)
    end = load_bundle(out / "export" / "step_00000001" / "mumu.safetensors")
    assert end.meta.tokens_per_image == 16
    assert end.meta.vlm_lora["rank"] == start.meta.vlm_lora["rank"] == 4
    assert set(end.vlm_lora_state) == set(start.vlm_lora_state)
    assert set(end.unet_lora_state) == set(start.unet_lora_state)
    # One Adam step moves each weight by at most ~lr: the run started from the bundle, not from scratch.
    for a, b in ((start.connector_state, end.connector_state), (start.unet_lora_state, end.unet_lora_state)):
        diffs = [(a[k] - b[k]).abs().max().item() for k in a]
        assert max(diffs) > 0 and max(diffs) < 3e-3
