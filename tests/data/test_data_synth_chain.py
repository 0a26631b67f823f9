"""The paper's data recipe end to end on tiny random models, with the commands a user types and no hand
edits in between: ``prompts -> synth -> bootstrap --format wds -> python -m train`` (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mumu_core.data.__main__ import main as data_main
from mumu_core.data.shards import read_shard

CONFIGS = Path(__file__).parents[2] / "train" / "configs"


@pytest.mark.slow  # four commands and 2 training steps; 3.7 min on the shared 2-core machine it was written on
def test_prompts_synth_bootstrap_train(tiny_models, tiny_gdino, tmp_path, capsys):
    from train.__main__ import main as train_main

    tm = tiny_models
    prompts = tmp_path / "prompts.jsonl"
    assert (
        data_main(["prompts", "--out", str(prompts), "--max-contents", "4", "--styles-per-content", "2"]) == 0
    )
    synth = tmp_path / "synth"
    rc = data_main(["synth", "--prompts", str(prompts), "--out", str(synth), "--sdxl", str(tm.sdxl),
                    "--pickscore", str(tm.pickscore), "--min-pickscore", "-1000", "--steps", "2",
                    "--resolution", "64", "--prompts-per-shard", "4", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    boot = tmp_path / "boot"
    rc = data_main(["bootstrap", "--format", "wds", "--input", str(synth), "--out", str(boot),
                    "--detector", str(tiny_gdino), "--box-threshold", "0", "--min-crop-side", "1",
                    "--max-crop-area", "1.0", "--controls", "canny", "--no-head-detection", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((boot / "manifest.json").read_text())
    assert manifest["counts"]["images_in"] == 8 and manifest["counts"]["images_out"] == 8
    rec = json.loads(next(read_shard(boot / "shard-000000.tar"))["json"])
    # The bootstrap's caption is synth's "content, style" prompt, traced back to the prompt id.
    assert rec["source_key"].startswith("p0000000") and ", " in rec["caption"]
    assert manifest["filter"]["kept"] > 0, manifest["filter"]

    run = tmp_path / "run"
    rc = train_main(["--config", str(CONFIGS / "tiny.yaml"), "--set", f"model.vlm={tm.vlm}",
                     f"model.sdxl={tm.sdxl}", f"data.shards={boot}/shard-*.tar", f"out_dir={run}",
                     "optim.max_steps=2", "checkpoint.every=2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert (run / "export" / "step_00000002" / "mumu.safetensors").is_file()
