"""The planned script drives the real ``python -m mumu_core generate`` (tiny models) end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from mumu_core.eval.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_plan_generate_then_evaluate(tmp_path, tiny_models, models):
    photos = tmp_path / "photos" / "rex"
    photos.mkdir(parents=True)
    for i, src in enumerate(tiny_models.images):
        Image.open(src).convert("RGB").save(photos / f"{i:02d}.png")
    suite = {
        "format": "mumu-eval-suite",
        "version": 1,
        "name": "one",
        "seeds": [7],
        "generate_args": ["--steps", "2"],
        "prompts": ["a {0} {1} in the snow"],
        "subjects": [{"id": "rex", "class": "dog", "live": True, "images": "photos/rex"}],
    }
    (tmp_path / "suite.json").write_text(json.dumps(suite))
    run = tmp_path / "run"
    model_args = [f"--generate-arg=--{k}={v}" for k, v in
                  (("vlm", tiny_models.vlm), ("bundle", tiny_models.bundle), ("sdxl", tiny_models.sdxl))]  # fmt: skip
    cmd = f"{sys.executable} -m mumu_core generate"
    assert (
        main(
            [
                "plan",
                "--suite",
                str(tmp_path / "suite.json"),
                "--out",
                str(run),
                "--generate-cmd",
                cmd,
                *model_args,
            ]
        )
        == 0
    )

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["bash", str(run / "generate.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    target = run / "generated" / "rex" / "00_s7.png"
    assert Image.open(target).size[0] > 0
    assert [p.name for p in target.parent.iterdir()] == ["00_s7.png"]  # temp folder cleaned up

    stamp = target.stat().st_mtime_ns
    rerun = subprocess.run(
        ["bash", str(run / "generate.sh")], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0 and rerun.stdout == "" and target.stat().st_mtime_ns == stamp  # skipped

    out = run / "results"
    rc = main(["run", "--manifest", str(run / "manifest.json"), "--out", str(out), "--metrics", "clip_t,clip_i,dino",
               "--clip", str(models / "clip"), "--dino", str(models / "dino")])  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["aggregate"]["images"] == 1 and res["aggregate"]["clip_i_n"] == 1
    assert res["cases"][0]["images"][0]["seed"] == 7
