"""The embedded MUMU-mini model: shipped weights, bundled demo prompts, the demo and the shipping step.

Layout of the shipped model (``mumu_core/mini/weights/model/``), the trainer's export format:
``vlm/`` (Idefics2 folder), ``sdxl/`` (diffusers folder: unet/ vae/ scheduler/) and ``mumu.safetensors``
(the bundle), with ``weights/model.json`` next to it recording the sha256 of every file, the command and
hardware that produced them and the evaluation summary.

Demo assets (``mumu_core/mini/demo/``): reference PNGs and ``prompts.json``. They are held-out
``eval``-split renders (never training images), made by :func:`make_demo_assets`; object references of
one prompt are crops of DIFFERENT source images.

    python -m mumu_core.mini demo --out outputs/demo
    python -m mumu_core.mini ship --export runs/mini/train/export/step_00004400 --recipe runs/mini/recipe.json
    python -m mumu_core.mini demo-assets            # rewrites mumu_core/mini/demo/
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from .world import DEFAULT_WORLD, build_caption, interleave, object_crop, render, scene_at, style_reference

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_DIR = PACKAGE_DIR / "weights"
MODEL_DIR = WEIGHTS_DIR / "model"
MODEL_JSON = WEIGHTS_DIR / "model.json"
DEMO_DIR = PACKAGE_DIR / "demo"
# Index range of the eval split used for the demo (the evaluation suites use 0 .. 300_000).
_DEMO_BASE = 900_000


class MiniModelError(ValueError):
    """The shipped mini model (or a given model folder) is missing, incomplete or does not match its hashes."""


# ------------------------------------------------------------------------------------------ model files


@dataclass(frozen=True)
class MiniModelPaths:
    vlm: Path
    sdxl: Path
    bundle: Path


def model_paths(root: str | Path = MODEL_DIR) -> MiniModelPaths:
    """The three parts of a mini model folder (an export or the shipped one), checked to exist."""
    root = Path(root)
    paths = MiniModelPaths(root / "vlm", root / "sdxl", root / "mumu.safetensors")
    missing = [str(p) for p in (paths.vlm, paths.sdxl, paths.bundle) if not p.exists()]
    if missing:
        raise MiniModelError(
            f"{root} is not a complete MUMU-mini model: missing {missing}. It needs vlm/ (Idefics2 folder), "
            "sdxl/ (diffusers unet/ vae/ scheduler/) and mumu.safetensors, as written by python -m train "
            "(out_dir/export/step_N); the shipped one is made by `python -m mumu_core.mini ship` "
            "(bash scripts/train_mini.sh trains one)"
        )
    return paths


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(root: str | Path) -> dict[str, str]:
    """sha256 of every file under ``root``, keyed by its POSIX path relative to ``root``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def verify_model(root: str | Path = MODEL_DIR, record: str | Path = MODEL_JSON) -> dict[str, Any]:
    """Check every file of the shipped model against the sha256 recorded in ``record``; returns the record."""
    root, record = Path(root), Path(record)
    if not record.is_file():
        raise MiniModelError(f"{record} is missing: ship a model with `python -m mumu_core.mini ship`")
    meta = json.loads(record.read_text())
    actual = file_hashes(root)
    expected = meta["files"]
    if actual != expected:
        changed = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
        raise MiniModelError(
            f"the model in {root} does not match {record}: {changed} differ (missing, extra or changed). "
            "Restore the files from git, or re-ship with `python -m mumu_core.mini ship`"
        )
    return meta


def _to_fp16_safetensors(path: Path) -> None:
    """Rewrite a safetensors file with its float32 tensors as float16, keeping the metadata (the bundle's
    ``mumu.*`` fields). Loaders cast back to the compute dtype."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.half() if v.dtype == torch.float32 else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)


def _hardware() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} CPU cores visible, {gpu}"


def ship(
    export_dir: str | Path,
    weights_dir: str | Path = WEIGHTS_DIR,
    fp16: bool = True,
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Copy a training export (``vlm/``, ``sdxl/``, ``mumu.safetensors``) into ``weights_dir/model`` (fp16 by
    default) and write ``weights_dir/model.json`` with the hashes plus ``info`` (command, hardware, ...)."""
    src = model_paths(export_dir)
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=weights_dir, prefix=".model.shipping."))
    try:
        shutil.copytree(src.vlm, tmp / "vlm")
        shutil.copytree(src.sdxl, tmp / "sdxl")
        shutil.copy2(src.bundle, tmp / "mumu.safetensors")
        if fp16:
            for p in sorted(tmp.rglob("*.safetensors")):
                _to_fp16_safetensors(p)
        dest = weights_dir / "model"
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {
        "format": "MUMU-mini model: the trainer's export layout (vlm/, sdxl/, mumu.safetensors)",
        "source_export": str(export_dir),
        "dtype": "float16" if fp16 else "float32",
        "hardware": _hardware(),
        **(info or {}),
        "files": file_hashes(weights_dir / "model"),
    }
    (weights_dir / "model.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ------------------------------------------------------------------------------------------ demo assets


@dataclass(frozen=True)
class DemoPrompt:
    name: str
    text: str  # with <image> placeholders, in image order
    images: tuple[str, ...]  # file names under the demo folder
    note: str  # what the references show and where they come from


def _demo_specs() -> list[tuple[str, str, list[tuple[str, dict[str, Any]]], str | None]]:
    """(name, category words, references, background reference style or None). A reference is
    ("object", scene constraints) cut from its own source scene."""
    obj = "object"
    return [
        ("red_circle", "shape", [(obj, {"colours": ["red"], "shapes": ["circle"]})], None),
        ("blue_square", "thing", [(obj, {"colours": ["blue"], "shapes": ["square"]})], None),
        ("yellow_triangle", "object", [(obj, {"colours": ["yellow"], "shapes": ["triangle"]})], None),
        ("green_cross", "shape", [(obj, {"colours": ["green"], "shapes": ["cross"]})], None),
        (
            "pair_magenta_circle_cyan_square",
            "shape thing",
            [
                (obj, {"colours": ["magenta"], "shapes": ["circle"]}),
                (obj, {"colours": ["cyan"], "shapes": ["square"]}),
            ],
            None,
        ),
        (
            "pair_red_cross_blue_triangle",
            "object shape",
            [
                (obj, {"colours": ["red"], "shapes": ["cross"]}),
                (obj, {"colours": ["blue"], "shapes": ["triangle"]}),
            ],
            None,
        ),
        ("style_textured", "shape", [], "textured"),
        ("style_gradient", "thing", [], "gradient"),
        (
            "yellow_square_on_textured",
            "object",
            [(obj, {"colours": ["yellow"], "shapes": ["square"]})],
            "textured",
        ),
    ]


def make_demo_assets(out: str | Path = DEMO_DIR) -> list[DemoPrompt]:
    """Write the demo's reference PNGs (held-out eval-split renders) and ``prompts.json``; returns the prompts.

    Each reference comes from its own source scene, so a two-object prompt combines crops from two
    different images; the source renders are written too (``*_source.png``) for the contact sheet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts: list[DemoPrompt] = []
    index = _DEMO_BASE
    for name, words, objects, bg_style in _demo_specs():
        files: list[str] = []
        inserts: list[tuple[int, str]] = []
        notes: list[str] = []
        word_list = words.split()
        caption, spans, bg_span = build_caption(word_list, "background")
        for k, (_, constraints) in enumerate(objects):
            src = scene_at("eval", index, DEFAULT_WORLD, n_objects=1, **constraints)
            index += 1
            base = f"{name}_ref{k + 1}"
            render(src).save(out / f"{base}_source.png")
            object_crop(src, 0).save(out / f"{base}.png")
            files.append(f"{base}.png")
            inserts.append((spans[k][0], ""))
            o = src.objects[0]
            notes.append(f"crop of a {o.colour} {o.shape} from eval scene {index - 1}")
        if bg_style is not None:
            src = scene_at("eval", index, DEFAULT_WORLD, n_objects=1, style=bg_style, require_style_box=True)
            index += 1
            base = f"{name}_bg"
            render(src).save(out / f"{base}_source.png")
            style_reference(src).save(out / f"{base}.png")
            files.append(f"{base}.png")
            inserts.append((bg_span[0], ""))
            notes.append(f"background patch ({bg_style}) of eval scene {index - 1}")
        prompts.append(DemoPrompt(name, interleave(caption, inserts, sep=""), tuple(files), "; ".join(notes)))
    (out / "prompts.json").write_text(
        json.dumps([p.__dict__ | {"images": list(p.images)} for p in prompts], indent=2) + "\n"
    )
    return prompts


def load_demo_prompts(folder: str | Path = DEMO_DIR) -> list[DemoPrompt]:
    folder = Path(folder)
    path = folder / "prompts.json"
    if not path.is_file():
        raise MiniModelError(
            f"{path} is missing: run `python -m mumu_core.mini demo-assets` to write the demo"
        )
    out = []
    for d in json.loads(path.read_text()):
        p = DemoPrompt(d["name"], d["text"], tuple(d["images"]), d.get("note", ""))
        missing = [f for f in p.images if not (folder / f).is_file()]
        if missing:
            raise MiniModelError(
                f"demo prompt {p.name!r}: reference images {missing} are missing in {folder}"
            )
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ demo


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
    draw.text(xy, text, fill=(230, 230, 230), font=ImageFont.load_default(size=12))


def contact_sheet(
    rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[Image.Image]]], scale: int = 4, gap: int = 4
) -> Image.Image:
    """One row per prompt: its text, then the references (padded onto the canvas size) | the samples."""
    side = DEFAULT_WORLD.canvas * scale
    n_refs = max((len(r[1]) for r in rows), default=0)
    n_out = max((len(r[2]) for r in rows), default=0)
    text_h = 18
    width = gap + (n_refs + n_out) * (side + gap) + 2 * gap
    height = gap + len(rows) * (text_h + side + gap)
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y = gap
    for text, refs, outs in rows:
        _label(draw, (gap, y + 2), text)
        y += text_h
        x = gap
        for k in range(n_refs):
            if k < len(refs):
                ref = refs[k].convert("RGB")
                f = scale * min(1.0, DEFAULT_WORLD.canvas / max(ref.size))
                ref = ref.resize((max(1, round(ref.width * f)), max(1, round(ref.height * f))), Image.NEAREST)
                tile = Image.new("RGB", (side, side), (0, 0, 0))
                tile.paste(ref, ((side - ref.width) // 2, (side - ref.height) // 2))
                sheet.paste(tile, (x, y))
            x += side + gap
        x += 2 * gap if n_refs else 0
        for im in outs:
            sheet.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (x, y))
            x += side + gap
        y += side + gap
    return sheet


def run_demo(
    out: str | Path,
    model: str | Path = MODEL_DIR,
    demo: str | Path = DEMO_DIR,
    samples: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    verify: bool = True,
) -> list[Path]:
    """Generate ``samples`` images per bundled prompt with the mini model; write ``<name>_<k>.png``
    (24 x 24, as generated), ``<name>_<k>_x8.png`` (enlarged) and ``contact_sheet.png``. Returns the PNGs."""
    import torch

    from ..pipeline import MumuPipeline
    from ..prompt import InterleavedPrompt

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if verify and Path(model) == MODEL_DIR:
        verify_model(model)
    paths = model_paths(model)
    prompts = load_demo_prompts(demo)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = MumuPipeline.from_paths(paths.vlm, paths.bundle, paths.sdxl, dtype=torch.float32, device="cpu")
    written: list[Path] = []
    rows = []
    from tqdm import tqdm

    for p in tqdm(prompts, desc="demo"):
        refs = [Image.open(Path(demo) / f).convert("RGB") for f in p.images]
        ip = InterleavedPrompt.parse(p.text, refs, tokens_per_image=pipe.preset.tokens_per_image)
        images = pipe([ip], seed=seed, steps=steps, guidance=guidance, batch=samples, progress=False)
        for k, im in enumerate(images):
            for suffix, img in (("", im), ("_x8", im.resize((im.width * 8, im.height * 8), Image.NEAREST))):
                path = out / f"{p.name}_{k}{suffix}.png"
                img.save(path)
                written.append(path)
        rows.append((p.text, refs, images))
    sheet = out / "contact_sheet.png"
    contact_sheet(rows).save(sheet)
    written.append(sheet)
    return written
