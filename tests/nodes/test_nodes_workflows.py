"""The bundled drag-and-drop workflows: file checks (CI), and every workflow run to an image in a real,
headless ComfyUI through the harness's comfy_run.py (skipped without one).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mumu_core.prompt import InterleavedPrompt

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "example_workflows"
WORKFLOWS = REPO / "workflows"
MINI = "mumu_mini_no_downloads"
REQUIRED = {
    MINI,
    "mumu_man_dog_animated",
    "mumu_style_transfer",
    "mumu_character_consistency",
    "mumu_lora_merge_finetune",
}


def load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", WORKFLOWS / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_workflows"] = mod
    spec.loader.exec_module(mod)
    return mod


def ui_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.json"))


def test_required_workflows_exist_with_thumbnails_and_are_listed_once():
    names = {p.stem for p in ui_files()}
    assert REQUIRED <= names
    # ComfyUI lists *.json from workflows/ too: copies there would show every template twice.
    assert not list(WORKFLOWS.glob("*.json"))
    for p in ui_files():
        thumb = EXAMPLES / f"{p.stem}.jpg"
        assert thumb.is_file(), f"no thumbnail {thumb}"
        with Image.open(thumb) as im:
            assert im.size == (640, 400)


def test_committed_files_match_the_generator():
    gen = load_generator()
    rendered = gen.render()
    assert set(rendered) == {p.name for p in ui_files()}
    for name, text in rendered.items():
        assert (EXAMPLES / name).read_text() == text, (
            f"{name} is stale: run python workflows/make_workflows.py"
        )


@pytest.mark.parametrize("path", ui_files(), ids=lambda p: p.stem)
def test_ui_format_structure(path: Path):
    wf = json.loads(path.read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == len(wf["links"])
    for n in wf["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"} <= set(n)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        out = nodes[src]["outputs"][src_slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == inp["type"] == typ
    # Every LoadImage names a shipped example image; the prompt's placeholders match the connected images.
    for n in wf["nodes"]:
        if n["type"] == "LoadImage":
            assert (EXAMPLES / "input" / n["widgets_values"][0]).is_file()
        if n["type"] == "MUMUPromptBuilder":
            connected = [i for i in n["inputs"] if i["name"].startswith("image") and i["link"] is not None]
            dummy = [Image.new("RGB", (8, 8))] * len(connected)
            InterleavedPrompt.parse(n["widgets_values"][0], dummy, 324)
    types = {n["type"] for n in wf["nodes"]}
    if path.stem == MINI:  # the no-download path: embedded model, its own sampler, no SDXL files
        assert types == {
            "MUMUMiniLoader",
            "LoadImage",
            "MUMUPromptBuilder",
            "MUMUMiniSampler",
            "SaveImage",
            "Note",
        }
        return
    assert {"MUMULoader", "MUMUPromptBuilder", "MUMUEncoder", "KSampler", "SaveImage"} <= types
    # The encoder sees the latent, so a prompt batch the latent cannot hold is refused, not cut.
    enc = next(n for n in wf["nodes"] if n["type"] == "MUMUEncoder")
    assert next(i for i in enc["inputs"] if i["name"] == "latent")["link"] is not None


def test_character_consistency_segments_its_reference():
    wf = json.loads((EXAMPLES / "mumu_character_consistency.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    seg = next(n for n in wf["nodes"] if n["type"] == "MUMUSegmentReference")
    assert seg["widgets_values"][:3] == ["person", "grounding-dino-base", "sam-vit-base"]
    targets = {
        (nodes[dst]["type"], nodes[dst]["inputs"][slot]["name"])
        for _, src, _, dst, slot, _ in wf["links"]
        if src == seg["id"]
    }
    assert targets == {("MUMUPromptBuilder", "image1"), ("MUMUPromptBuilder", "mask1")}


# -- in a real ComfyUI --------------------------------------------------------------------------------

FAST = {"EmptyLatentImage": {0: 64, 1: 64}, "KSampler": {2: 2}, "MUMUEncoder": {i: 64 for i in (0, 1, 4, 5)}}


def fast_copy(src: Path, dst: Path, image: str | None = None) -> None:
    """The workflow at 64x64 px and 2 steps (CPU), otherwise unchanged (the mini one runs as shipped);
    ``image``: another picture for its LoadImage, as a user swapping the reference would."""
    wf = json.loads(src.read_text())
    for n in wf["nodes"]:
        for i, v in FAST.get(n["type"], {}).items():
            n["widgets_values"][i] = v
        if image is not None and n["type"] == "LoadImage":
            n["widgets_values"][0] = image
    dst.write_text(json.dumps(wf))


def mini_colour_verdict(files: list[str]) -> list[str | None]:
    """The mini analyser's colour of the largest object in each generated image (None: nothing found)."""
    from mumu_core.mini.analyser import Analyser

    images = []
    for f in files:
        with Image.open(f) as im:
            images.append(im.convert("RGB"))
    return [a.detections[0].colour if a.detections else None for a in Analyser.load().analyse(images)]


def exported_lora_workflow(lora_name: str) -> dict:
    """API format: the exported kohya LoRA through the stock LoraLoaderModelOnly, sampled with MUMU."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0},
        },
        "3": {
            "class_type": "MUMULoader",
            "inputs": {
                "vlm": "idefics2-8b",
                "bundle": "mumu-sdxl.safetensors",
                "dtype": "auto",
                "device": "offload after encoding",
            },
        },
        "4": {"class_type": "LoadImage", "inputs": {"image": "mumu_dog.png"}},
        "5": {
            "class_type": "MUMUPromptBuilder",
            "inputs": {
                "text": "a <image> dog on a beach",
                "image1": ["4", 0],
                **{f"tokens{i}": "default" for i in range(1, 5)},
                **{f"weight{i}": 1.0 for i in range(1, 5)},
            },
        },
        "6": {
            "class_type": "MUMUEncoder",
            "inputs": {
                "mumu_model": ["3", 0],
                "mumu_prompt": ["5", 0],
                "width": 64,
                "height": 64,
                "crop_w": 0,
                "crop_h": 0,
                "target_width": 64,
                "target_height": 64,
            },
        },
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "positive": ["6", 0],
                "negative": ["6", 1],
                "latent_image": ["7", 0],
                "seed": 1,
                "steps": 2,
                "cfg": 6.0,
                "sampler_name": "ddim",
                "scheduler": "ddim_uniform",
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {
            "class_type": "SaveImage",
            "inputs": {"images": ["9", 0], "filename_prefix": "MUMU/exported_lora"},
        },
    }


@pytest.mark.comfyui
@pytest.mark.slow
def test_every_workflow_runs_to_an_image_in_comfyui(comfy_env, comfy_models, tmp_path):
    runner = comfy_env.harness / "comfy_run.py"
    if not runner.is_file():
        pytest.skip(f"comfy harness not found at {runner}: set MUMU_COMFY_HARNESS")
    # A base directory of our own: the exported LoRA, saved checkpoint, inputs and outputs stay in tmp.
    base = tmp_path / "base"
    (base / "custom_nodes").mkdir(parents=True)
    pack = base / "custom_nodes" / "ComfyUI-MUMU"
    os.symlink(REPO, pack)
    shutil.copytree(EXAMPLES / "input", base / "input")
    runs = []
    for p in ui_files():
        dst = tmp_path / p.name
        fast_copy(p, dst)
        runs.append(dst)
    # The no-download template with its reference swapped: its output must follow the new picture.
    swapped = tmp_path / f"{MINI}_blue.json"
    fast_copy(EXAMPLES / f"{MINI}.json", swapped, image="mumu_mini_blue_square.png")
    runs.append(swapped)
    lora_name = "mumu/mumu_unet_lora_00001_.safetensors"  # MUMUSaveLora's first file in a fresh folder
    extra = tmp_path / "exported_lora_api.json"
    extra.write_text(json.dumps(exported_lora_workflow(lora_name)))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(runner),
        "--comfy",
        str(comfy_env.comfy_dir),
        "--venv",
        str(comfy_env.python.parents[1]),
        "--node-pkg",
        str(pack),
        "--models-dir",
        str(comfy_models),
        "--expect-node",
        "MUMUEncoder",
        f"--server-arg=--base-directory={base}",
        "--get",
        "/workflow_templates",
        "--out",
        str(out),
        "--timeout",
        "900",
    ]
    for w in [*runs, extra]:
        cmd += ["--workflow", str(w)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000)
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    log = (out / "server.log").read_text()
    assert proc.returncode == 0 and summary["ok"], json.dumps(summary, indent=1)[-6000:] + log[-3000:]
    assert not [f for f in summary["import_failures"] if "MUMU" in f]
    templates = summary["get"]["/workflow_templates"]
    assert REQUIRED <= set(templates["ComfyUI-MUMU"])
    assert len(summary["runs"]) == len(runs) + 1
    by_name = {Path(r["workflow"]).stem: r for r in summary["runs"]}
    for run in summary["runs"]:
        assert run.get("images"), f"{run['workflow']} made no image: {run}"
        size = (192, 192) if Path(run["workflow"]).stem.startswith(MINI) else (64, 64)
        for f in run["images"]:
            with Image.open(f) as im:
                assert im.size == size
    # The embedded MUMU-mini model, no downloads: 4 pictures that follow their reference's colour.
    for name, colour in ((MINI, "red"), (f"{MINI}_blue", "blue")):
        verdict = mini_colour_verdict(by_name[name]["images"])
        assert len(verdict) == 4 and verdict.count(colour) >= 3, (name, verdict)
        assert by_name[name]["exec_s"] < 120, by_name[name]
    assert "lora key not loaded" not in log
    assert (base / "models" / "loras" / lora_name).is_file()
    saved = list((out / "comfy_output" / "checkpoints").glob("animagine_mumu*.safetensors"))
    assert saved and saved[0].stat().st_size > 1e9
