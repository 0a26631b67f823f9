"""The embedded MUMU-mini model: shipped weights match their record, shipping keeps outputs, the demo runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mumu_core.mini import demo as D
from mumu_core.mini.__main__ import main


def test_shipped_weights_match_their_record() -> None:
    meta = D.verify_model()  # every file's sha256 (the bundle and the bases it names), none missing or extra
    paths = D.model_paths()
    own = sum(p.stat().st_size for p in D.MODEL_DIR.rglob("*") if p.is_file())
    assert own < 2_000_000, f"the MUMU part (bundle) should stay small, it is {own / 1e6:.1f} MB"
    for key in ("command", "hardware", "recipe", "dtype", "files", "base_files"):
        assert meta.get(key), f"model.json lacks {key}"
    assert "scripts/train_mini.sh" in meta["command"]
    assert meta["recipe"]["wall_s"] > 0
    assert {"bases.json", "mumu.safetensors"} == set(meta["files"])
    assert paths.vlm == (D.WEIGHTS_DIR / "base" / "vlm").resolve()
    assert paths.sdxl == (D.WEIGHTS_DIR / "base" / "t2i").resolve()
    assert "unet/config.json" in meta["base_files"]["sdxl"] and "config.json" in meta["base_files"]["vlm"]


def test_verify_detects_a_changed_file(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(D.MODEL_DIR, weights / "model")
    shutil.copytree(D.WEIGHTS_DIR / "base", weights / "base")
    record = weights / "model.json"
    shutil.copy(D.MODEL_JSON, record)
    D.verify_model(weights / "model", record)
    cfg = weights / "base" / "t2i" / "unet" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    with pytest.raises(D.MiniModelError, match="unet/config.json"):
        D.verify_model(weights / "model", record)


def test_ship_on_bases_copies_only_the_bundle_and_refuses_other_bases(tmp_path: Path) -> None:
    from mumu_core.testing import build_tiny_models

    models = build_tiny_models(tmp_path / "models", "mini")
    weights = tmp_path / "weights"
    shutil.copytree(models.vlm, weights / "base" / "vlm")
    shutil.copytree(models.sdxl, weights / "base" / "t2i")
    export = tmp_path / "export"
    shutil.copytree(models.vlm, export / "vlm")
    shutil.copytree(models.sdxl, export / "sdxl")
    shutil.copy(models.bundle, export / "mumu.safetensors")
    bases = {"vlm": weights / "base" / "vlm", "sdxl": weights / "base" / "t2i"}
    record = D.ship(export, weights, fp16=False, info={"command": "test"}, bases=bases)
    assert set(record["files"]) == {"bases.json", "mumu.safetensors"}
    D.verify_model(weights / "model", weights / "model.json")
    assert D.model_paths(weights / "model").sdxl == bases["sdxl"].resolve()
    from safetensors.torch import load_file, save_file

    f = next((weights / "base" / "t2i" / "unet").glob("*.safetensors"))
    sd = load_file(str(f))
    k = next(iter(sd))
    sd[k] = sd[k] + 1  # the base is no longer what the export was trained on
    save_file(sd, str(f))
    with pytest.raises(D.MiniModelError, match="differs from the base"):
        D.ship(export, weights, fp16=False, info={"command": "test"}, bases=bases)


def test_ship_fp16_keeps_the_outputs(tmp_path: Path, one_thread) -> None:
    from mumu_core.mini.evaluate import pipeline_generator, single_cases
    from mumu_core.testing import build_tiny_models

    models = build_tiny_models(tmp_path / "models", "mini")
    export = tmp_path / "export"
    shutil.copytree(models.vlm, export / "vlm")
    shutil.copytree(models.sdxl, export / "sdxl")
    shutil.copy(models.bundle, export / "mumu.safetensors")
    record = D.ship(export, tmp_path / "weights", info={"command": "test"})
    assert record["dtype"] == "float16" and record["command"] == "test"
    shipped = D.model_paths(tmp_path / "weights" / "model")
    D.verify_model(tmp_path / "weights" / "model", tmp_path / "weights" / "model.json")

    prompts = [c.prompt for c in single_cases(4, 16)]
    a = pipeline_generator(export / "vlm", export / "mumu.safetensors", export / "sdxl", steps=4)(
        prompts, 1.5, 0
    )
    b = pipeline_generator(shipped.vlm, shipped.bundle, shipped.sdxl, steps=4)(prompts, 1.5, 0)
    diff = max(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() for x, y in zip(a, b))
    assert diff <= 8, f"fp16 shipping moved pixels by {diff}/255"


def test_model_paths_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "vlm").mkdir()
    with pytest.raises(D.MiniModelError, match="mumu.safetensors"):
        D.model_paths(tmp_path)


def test_model_paths_of_a_lora_export_come_from_its_runs_config(tmp_path: Path) -> None:
    # python -m train's LoRA export holds the bundle only; the run's config names the bases it trained on.
    export = tmp_path / "run" / "export" / "step_00000010"
    export.mkdir(parents=True)
    (export / "mumu.safetensors").write_bytes(b"")
    vlm, sdxl = tmp_path / "bases" / "vlm", tmp_path / "bases" / "t2i"
    config = {"model": {"vlm": str(vlm), "sdxl": str(sdxl)}}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(D.MiniModelError, match="config.json"):  # bases named but absent
        D.model_paths(export)
    vlm.mkdir(parents=True)
    sdxl.mkdir()
    assert D.model_paths(export) == D.MiniModelPaths(vlm, sdxl, export / "mumu.safetensors")


def test_demo_command_writes_pngs_sheet_and_summary(tmp_path: Path, one_thread, capsys) -> None:
    prompts = D.load_demo_prompts()
    assert any(len(p.images) == 2 and "ref2" in p.images[1] for p in prompts), "a two-crop prompt"
    assert any(p.images and p.images[-1].endswith("_bg.png") for p in prompts), "a style reference"
    out = tmp_path / "demo"
    n = 2
    assert main(["demo", "--out", str(out), "--samples", str(n), "--steps", "2"]) == 0
    for p in prompts:
        for k in range(n):
            for stem in (p.name, f"{p.name}_textonly"):
                assert Image.open(out / f"{stem}_{k}.png").size == (24, 24)
    lines = (out / "summary.txt").read_text().splitlines()
    assert len(lines) == 3 and str(out / "contact_sheet.png") in lines[0]
    assert capsys.readouterr().out.splitlines()[-3:] == lines  # printed too
    report = json.loads((out / "summary.json").read_text())
    assert report["summary"] == lines and report["settings"]["samples"] == n
    n_obj = sum(r.kind == "object" for p in prompts for r in p.references) * n
    n_styled = sum(any(r.kind == "style" for r in p.references) for p in prompts) * n
    for key in ("with_references", "text_only"):
        counts = report[key]
        assert (counts["objects"], counts["styled"], counts["samples"]) == (n_obj, n_styled, n * len(prompts))
        for what in ("colour", "shape", "style"):
            assert 0 <= counts[what] <= (n_styled if what == "style" else n_obj)
        listed = [
            m
            for p in report["prompts"]
            for m in p["samples" if key == "with_references" else "text_only_samples"]
        ]
        assert counts["colour"] == sum(o["colour_ok"] for m in listed for o in m["objects"])
        assert counts["all_right"] == sum(m["all_right"] for m in listed)
    w = report["with_references"]
    assert f"colour in {w['colour']}/{n_obj} objects" in lines[1]
    layout = D.sheet_layout(max(len(p.images) for p in prompts), n, len(prompts), lines)
    assert Image.open(out / "contact_sheet.png").size == layout.size


def test_demo_assets_are_reproducible(tmp_path: Path) -> None:
    prompts = D.make_demo_assets(tmp_path)
    assert json.loads((tmp_path / "prompts.json").read_text()) == json.loads(
        (D.DEMO_DIR / "prompts.json").read_text()
    )
    for p in prompts:
        for f in p.images:
            assert np.array_equal(
                np.asarray(Image.open(tmp_path / f)), np.asarray(Image.open(D.DEMO_DIR / f))
            )


def test_demo_on_a_missing_model_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nothing")]) == 2
    assert "not a complete MUMU-mini model" in capsys.readouterr().err


def test_findings_script_refuses_an_incomplete_model_folder(tmp_path: Path) -> None:
    import subprocess

    root = Path(__file__).parents[2]
    (tmp_path / "model").mkdir()
    res = subprocess.run(
        ["bash", str(root / "scripts" / "mini_findings.sh"), str(tmp_path / "model"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "not a complete MUMU-mini model" in res.stderr and "bases.json" in res.stderr
    assert not (tmp_path / "out").exists()  # nothing written before the check
