"""MUMU-mini v2 at a shortened length: the text-to-image base and its fine-tune train and reload, and the
MUMU stage on top follows Table 1's structure (vision frozen, VLM + modality projection LoRA rank 8,
connector fully trained, UNet LoRA rank 8, CLIP unused) through the real trainer and formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mumu_core.mini import base_t2i as T
from mumu_core.mini.world import COLOURS, SHAPES, scene_at

CONFIGS = Path(__file__).parents[2] / "train" / "configs"


def test_base_caption_names_every_attribute_and_mumu_caption_none() -> None:
    for i in range(50):
        s = scene_at("train", i)
        cap = T.base_caption(s)
        for o in s.objects:
            assert f"{o.colour} {o.shape}" in cap
        assert f"{s.background.style} background" in cap
        assert not any(w in s.caption.split() for w in (*COLOURS, *SHAPES))  # the MUMU caption
        ids = T.make_text_tokenizer()(cap).input_ids
        assert T.make_text_tokenizer().unk_token_id not in ids, cap


def test_frame_style_and_rule() -> None:
    imgs = np.stack([np.asarray(T.render_batch([scene_at("eval", i)])[0]) for i in range(20)])
    assert (T.frame_score(imgs) >= T.FRAMED_MAX_BRIGHTNESS).all(), "the base world never looks framed"
    assert (T.frame_score(T.apply_style(imgs, "framed")) < T.FRAMED_MAX_BRIGHTNESS).all()
    with pytest.raises(T.BaseModelError, match="framed"):
        T.apply_style(imgs, "sepia")


def test_base_trains_resumes_exactly_and_loads_as_sdxl(tmp_path: Path, one_thread) -> None:
    from mumu_core.presets import MINI
    from mumu_core.sdxl import load_sdxl

    def run(out: Path, steps: int) -> Path:
        cfg = T.T2ITrainConfig(out=out, max_steps=steps, batch_size=4, warmup_steps=1, checkpoint_every=2)
        return T.train_t2i(cfg, log=lambda _m: None)

    straight = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4)
    a = T.load_t2i(straight)
    b = T.load_t2i(resumed)
    for (k, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"resume is not exact at {k}"
    comps = load_sdxl(straight, MINI)  # the trainer's loader reads the base like an SDXL folder
    assert list(comps.unet.config.block_out_channels) == T.BASE_UNET["block_out_channels"]
    hist = json.loads((tmp_path / "b" / "train.json").read_text())
    assert hist["step"] == 4 and hist["finished"]
    ctx, pooled = a.embed(["a red circle on a flat background", ""])
    assert ctx.shape == (2, T.TEXT_MAX_LEN, MINI.unet["cross_attention_dim"])
    assert pooled.shape == (2, MINI.connector.pooled_dim)
    assert not torch.allclose(ctx[0], ctx[1])
    img = T.generate(a, ["a red circle on a flat background"], guidance=2.0, steps=2)
    assert img.shape == (1, 24, 24, 3) and img.dtype == np.uint8


def test_min_snr_weighting_caps_low_noise_steps_and_keeps_pure_noise() -> None:
    from diffusers import DDIMScheduler

    from mumu_core.presets import MINI

    sched = DDIMScheduler(**MINI.scheduler)
    t = torch.tensor([0, 500, 999])
    pred, target = torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4)
    plain = T._weighted_loss(pred, target, t, sched, None)
    assert plain.item() == pytest.approx(1.0)
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    assert snr[0] > 5 and snr[2] == 0  # the schedule ends at zero SNR
    got = T._weighted_loss(pred, target, t, sched, 5.0)
    expect = (5 / (snr[0] + 1) + min(snr[1], 5) / (snr[1] + 1) + 1.0) / 3
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    assert got < plain


def test_train_continues_from_a_base_folder_with_min_snr(tmp_path: Path, one_thread) -> None:
    base = T.train_t2i(
        T.T2ITrainConfig(out=tmp_path / "base", max_steps=1, batch_size=2), log=lambda _m: None
    )
    args = ["base-t2i", "train", "--init", str(base), "--out", str(tmp_path / "more"), "--max-steps", "1"]
    args += ["--batch-size", "2", "--min-snr", "5", "--seed", "1", "--warmup-steps", "1"]
    args += ["--p-two-objects", "1"]
    from mumu_core.mini.__main__ import main

    assert main(args) == 0
    hist = json.loads((tmp_path / "more" / "train.json").read_text())
    assert hist["config"]["init"] == str(base) and hist["config"]["min_snr_gamma"] == 5.0
    assert hist["config"]["p_two_objects"] == 1.0
    b, m = T.load_t2i(base), T.load_t2i(tmp_path / "more" / "model")
    assert any(
        not torch.equal(p, q)
        for p, q in zip(b.unet.state_dict().values(), m.unet.state_dict().values(), strict=True)
    )
    # A missing --init folder fails before anything is written.
    bad = ["base-t2i", "train", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and not (tmp_path / "x").exists()
    # So does a share of two-object scenes that is not a probability.
    bad = ["base-t2i", "train", "--p-two-objects", "1.5", "--out", str(tmp_path / "x")]
    assert main(bad) == 2 and not (tmp_path / "x").exists()


def test_batch_share_of_two_object_scenes() -> None:
    def objects(p: float | None) -> list[int]:
        _, captions = T.batch_at(3, 16, 0, None, p)
        return [c.count(" and ") + 1 for c in captions]

    assert objects(1.0) == [2] * 16 and objects(0.0) == [1] * 16
    assert set(objects(None)) == {1, 2}  # the world's own 0.5
    assert T.batch_at(3, 4, 0, None)[1] == T.batch_at(3, 4, 0, None, None)[1]


def test_finetune_starts_from_the_base_and_freezes_clip(tmp_path: Path, one_thread) -> None:
    base = T.train_t2i(
        T.T2ITrainConfig(out=tmp_path / "base", max_steps=1, batch_size=2), log=lambda _m: None
    )
    cfg = T.T2ITrainConfig(
        out=tmp_path / "ft", max_steps=2, batch_size=2, init=base, style="framed", train_text_encoder=False
    )
    ft = T.train_t2i(cfg, log=lambda _m: None)
    b, f = T.load_t2i(base), T.load_t2i(ft)
    for p, q in zip(b.text_encoder.state_dict().values(), f.text_encoder.state_dict().values(), strict=True):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q)
        for p, q in zip(b.unet.state_dict().values(), f.unet.state_dict().values(), strict=True)
    )


def test_mumu_stage_follows_table_1(tmp_path: Path, one_thread) -> None:
    """Two steps of train/configs/mini.yaml on random bases of the v2 classes: what trains is Table 1's."""
    from mumu_core.bundle import load_bundle
    from mumu_core.data.pipeline import bootstrap
    from mumu_core.mini.world import bootstrap_config, bootstrap_source
    from mumu_core.presets import MINI, build_vlm_folder
    from train.config import load_config
    from train.loop import run

    base = T.build_t2i(0).save(tmp_path / "t2i")
    vlm = build_vlm_folder(MINI, tmp_path / "vlm")
    shards = tmp_path / "shards"
    bootstrap(bootstrap_source("train", 40, images_per_part=40), shards, bootstrap_config(), progress=False)
    cfg = load_config(
        CONFIGS / "mini.yaml",
        [
            f"model.vlm={vlm}",
            f"model.sdxl={base}",
            f"data.shards={shards}/*.tar",
            f"out_dir={tmp_path / 'run'}",
            "optim.max_steps=2",
            "optim.batch_size=4",
            "optim.warmup_steps=0",
            "checkpoint.every=2",
            "logging.sample_every=0",
            "logging.tensorboard=false",
            "logging.progress=false",
        ],
    )
    seen: dict[str, dict[str, bool]] = {}

    def inspect(built) -> None:
        seen["trainable"] = {n: p.requires_grad for n, p in built.model.named_parameters()}

    run(cfg, inspect=inspect)
    tr = seen["trainable"]
    assert not any(v for n, v in tr.items() if n.startswith("encoder.vlm.vision_model."))
    assert all(v for n, v in tr.items() if n.startswith("connector."))
    vlm_train = [n for n, v in tr.items() if n.startswith("encoder.") and v]
    unet_train = [n for n, v in tr.items() if n.startswith("unet.") and v]
    assert vlm_train and all("lora_" in n for n in vlm_train)
    assert any("modality_projection" in n for n in vlm_train), "the vision-to-LLM MLP gets a LoRA"
    assert unet_train and all("lora_" in n for n in unet_train)
    assert not any("perceiver" in n for n in tr), "the perceiver is removed after loading"
    export = tmp_path / "run" / "export" / "step_00000002"
    bundle = load_bundle(export / "mumu.safetensors")
    assert bundle.meta.vlm_lora["rank"] == 8 and bundle.meta.unet_lora["rank"] == 8
    assert bundle.vlm_lora_state and bundle.unet_lora_state

    # Finding 4's merge: `python -m mumu_core fuse` on a diffusers folder writes a folder whose UNet has
    # the LoRA merged (exactly the runtime LoRA's outputs); the input folder is never touched.
    from mumu_core.bundle import BundleError, apply_unet_lora, fuse_unet_lora_into_checkpoint
    from mumu_core.sdxl import load_sdxl

    merged = fuse_unet_lora_into_checkpoint(bundle, base, tmp_path / "merged")
    assert (merged / "text_encoder").is_dir() and (merged / "tokenizer").is_dir()
    with pytest.raises(BundleError, match="exists"):
        fuse_unet_lora_into_checkpoint(bundle, base, tmp_path / "merged")
    runtime = load_sdxl(base, MINI).unet
    apply_unet_lora(runtime, bundle)
    fused = load_sdxl(merged, MINI).unet
    x, t = torch.randn(2, 3, 24, 24), torch.tensor([10, 500])
    ctx = torch.randn(2, 5, MINI.unet["cross_attention_dim"])
    add = {"text_embeds": torch.randn(2, MINI.connector.pooled_dim), "time_ids": torch.zeros(2, 6)}
    with torch.no_grad():
        a = runtime(x, t, encoder_hidden_states=ctx, added_cond_kwargs=add).sample
        b = fused(x, t, encoder_hidden_states=ctx, added_cond_kwargs=add).sample
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_init_writes_the_from_scratch_starting_point(tmp_path: Path, one_thread) -> None:
    from mumu_core.mini.__main__ import main
    from mumu_core.presets import MINI
    from mumu_core.sdxl import load_sdxl

    out = tmp_path / "random"
    assert main(["base-t2i", "init", "--out", str(out)]) == 0
    comps = load_sdxl(out, MINI)  # the trainer reads it as it reads the trained base
    umask = os.umask(0o022)
    os.umask(umask)
    for f in out.rglob("*"):  # readable by others as the umask allows (diffusers alone writes 0600)
        want = (0o777 if f.is_dir() else 0o666) & ~umask
        assert f.stat().st_mode & 0o777 == want, f
    assert list(comps.unet.config.block_out_channels) == T.BASE_UNET["block_out_channels"]
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["base-t2i", "init", "--out", str(out)]) == 2  # never overwrites
    assert sorted(p.name for p in out.rglob("*")) == before
