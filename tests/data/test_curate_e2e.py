"""The issue's "done when": curate -> bootstrap -> python -m train --config train/configs/stage2.yaml,
end to end on tiny random models (the CLIs, in process)."""

from __future__ import annotations

import json
from pathlib import Path

from curate_fixtures import photos, write_folder

from mumu_core.data import read_shard
from mumu_core.data.__main__ import main as data_cli

STAGE2 = Path(__file__).parents[2] / "train" / "configs" / "stage2.yaml"


def test_curate_then_bootstrap_then_stage2_training(tiny_curate, tiny_gdino, tiny_models, tmp_path):
    from train.__main__ import main as train_cli

    photos_dir = write_folder(tmp_path / "photos", photos(4))
    curated, boot, run = tmp_path / "curated", tmp_path / "boot", tmp_path / "run"
    rc = data_cli(
        ["curate", "--input", str(photos_dir), "--out", str(curated),
         "--sfw-model", str(tiny_curate["sfw"]), "--watermark-model", str(tiny_curate["watermark"]),
         "--people-model", str(tiny_curate["people"]), "--caption-model", str(tiny_curate["llava"]),
         "--max-nsfw", "1", "--max-watermark", "1", "--people-threshold", "0.99",
         "--min-short-side", "64", "--min-megapixels", "0", "--caption-max-tokens", "6",
         "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    manifest = json.loads((curated / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 4

    rc = data_cli(
        ["bootstrap", "--input", str(curated), "--out", str(boot), "--detector", str(tiny_gdino),
         "--box-threshold", "0", "--min-crop-side", "4", "--max-crop-area", "1", "--controls", "canny",
         "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    recs = [json.loads(s["json"]) for p in sorted(boot.glob("shard-*.tar")) for s in read_shard(p)]
    assert len(recs) == 4
    captions = {json.loads(s["json"])["caption"] for s in read_shard(curated / "shard-000000.tar")}
    assert {r["caption"] for r in recs} == captions  # the bootstrap grounded the LLaVA captions
    assert any(o["kept"] and o["is_person"] and o["crop"] for r in recs for o in r["objects"])

    rc = train_cli(
        ["--config", str(STAGE2), "--set", "model.preset=tiny", f"model.vlm={tiny_models.vlm}",
         f"model.sdxl={tiny_models.sdxl}", f"model.init_bundle={tiny_models.bundle}",
         "model.param_dtype=fp32", "model.frozen_dtype=fp32", "model.gradient_checkpointing=false",
         f"data.shards={','.join(str(p) for p in sorted(boot.glob('shard-*.tar')))}",
         "data.tokens_per_image=0", "data.resolution=32", "data.prefetch=2",
         "optim.batch_size=1", "optim.grad_accum=1", "optim.max_steps=1", "optim.warmup_steps=0",
         "checkpoint.every=1", "logging.sample_every=0", "logging.progress=false", f"out_dir={run}"]
    )  # fmt: skip
    assert rc == 0
    from mumu_core.bundle import load_bundle

    bundle = load_bundle(run / "export" / "step_00000001" / "mumu.safetensors")
    assert (
        bundle.meta.tokens_per_image == 16
    )  # stage 2: 4x the tiny preset's 4 tokens (the paper's 1296 = 4 x 324)
