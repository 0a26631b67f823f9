"""The embedded MUMU-mini model: shipped weights, bundled demo prompts, the demo and the shipping step.

Layout of the shipped model (``mumu_core/mini/weights/model/``), the trainer's export format:
``vlm/`` (Idefics2 folder), ``sdxl/`` (diffusers folder: unet/ vae/ scheduler/) and ``mumu.safetensors``
(the bundle), with ``weights/model.json`` next to it recording the sha256 of every file, the command and
hardware that produced them and the evaluation summary.

Demo assets (``mumu_core/mini/demo/``): reference PNGs and ``prompts.json`` (with each reference's ground
truth). They are held-out ``eval``-split renders (never training images), made by :func:`make_demo_assets`;
object references of one prompt are crops of DIFFERENT source images.

The demo explains itself: every prompt is also sampled text-only (image tokens removed, same seeds), the
analyser judges every sample against the prompt's references, and the contact sheet (references | samples |
text-only, each sample bordered green/red with the analysed words) plus a three-line summary
(``summary.txt`` / ``summary.json``) say what the references changed.

    python -m mumu_core.mini demo --out outputs/demo
    python -m mumu_core.mini ship --export runs/mini/train/export/step_00004400 --recipe runs/mini/recipe.json
    python -m mumu_core.mini demo-assets            # rewrites mumu_core/mini/demo/
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .analyser import Analyser, AnalyserError, Analysis
from .evaluate import MiniPrompt, Reference
from .world import (
    COLOURS,
    DEFAULT_WORLD,
    SHAPES,
    STYLES,
    build_caption,
    interleave,
    object_crop,
    render,
    scene_at,
    style_reference,
)

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


BASES_FILE = "bases.json"


def model_paths(root: str | Path = MODEL_DIR) -> MiniModelPaths:
    """The three parts of a mini model folder (an export or the shipped one), checked to exist.

    An export holds ``vlm/``, ``sdxl/`` and ``mumu.safetensors``. The shipped model holds only the bundle
    and ``bases.json``, which names the base folders it was trained on (relative to the model folder,
    ``../base/vlm`` and ``../base/t2i``): under LoRA the bases are not changed, so they are not copied. A
    LoRA run's export (``out_dir/export/step_N``: the bundle only) resolves its bases from the run's
    ``out_dir/config.json`` (paths as given to the trainer, relative to its working directory).
    """
    root = Path(root)
    vlm, sdxl = root / "vlm", root / "sdxl"
    if (root / BASES_FILE).is_file():
        bases = json.loads((root / BASES_FILE).read_text())
        vlm, sdxl = (root / bases["vlm"]).resolve(), (root / bases["sdxl"]).resolve()
    elif not (vlm.is_dir() or sdxl.is_dir()) and (root.parent.parent / "config.json").is_file():
        # A LoRA run's export (out_dir/export/step_N) is the bundle only: its bases are in the run's config.
        vlm, sdxl = _trained_bases(root)
    paths = MiniModelPaths(vlm, sdxl, root / "mumu.safetensors")
    missing = [str(p) for p in (paths.vlm, paths.sdxl, paths.bundle) if not p.exists()]
    if missing:
        raise MiniModelError(
            f"{root} is not a complete MUMU-mini model: missing {missing}. It needs vlm/ (Idefics2 folder), "
            "sdxl/ (diffusers unet/ vae/ scheduler/) and mumu.safetensors, as written by python -m train "
            f"(out_dir/export/step_N; a LoRA run's export takes its bases from the run's config.json), or "
            f"mumu.safetensors + {BASES_FILE} naming the base folders; the shipped "
            "one is made by `python -m mumu_core.mini ship` (bash scripts/train_mini.sh trains one)"
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
    paths = model_paths(root)
    checks = [(root, meta["files"])]
    for part, folder in (("vlm", paths.vlm), ("sdxl", paths.sdxl)):
        if part in meta.get("base_files", {}):
            checks.append((folder, meta["base_files"][part]))
    for folder, expected in checks:
        actual = file_hashes(folder)
        if actual != expected:
            changed = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
            raise MiniModelError(
                f"the model files in {folder} do not match {record}: {changed} differ (missing, extra or "
                "changed). Restore the files from git, or re-ship with `python -m mumu_core.mini ship`"
            )
    return meta


def load_pipeline(model: str | Path | None = None, verify: bool = True, device: str = "cpu"):
    """A float32 :class:`~mumu_core.pipeline.MumuPipeline` of the embedded MUMU-mini model (or ``model``).

    Whatever model is shipped in :data:`MODEL_DIR` is used (it is checked against ``model.json``'s hashes
    when ``verify``); ComfyUI's MUMU-mini Loader and ``python -m mumu_core generate --mini`` call this.
    """
    import torch

    from ..pipeline import MumuPipeline

    root = MODEL_DIR if model is None else Path(model)
    if verify and root == MODEL_DIR:
        verify_model(root)
    paths = model_paths(root)
    return MumuPipeline.from_paths(paths.vlm, paths.bundle, paths.sdxl, dtype=torch.float32, device=device)


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
    bases: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Copy a training export into ``weights_dir/model`` (fp16 by default) and write ``weights_dir/model.json``
    with the hashes plus ``info`` (command, hardware, ...).

    With ``bases`` (``{"vlm": folder, "sdxl": folder}``, the shipped base folders), only the bundle is copied
    and ``bases.json`` points at those folders: the export's ``vlm/`` and ``sdxl/`` must hold exactly the bases'
    tensors (a LoRA run leaves them unchanged), which is checked, so the shipped model is what was trained.
    """
    export_dir = Path(export_dir)
    if bases is None:
        src = model_paths(export_dir)
    else:
        # A LoRA run's export is the bundle only; the bases it trained on are in the run's config.
        src = MiniModelPaths(*_trained_bases(export_dir), export_dir / "mumu.safetensors")
        if not src.bundle.is_file():
            raise MiniModelError(f"{src.bundle} is missing: give python -m train's out_dir/export/step_N")
    weights_dir = Path(weights_dir)
    weights_dir.mkdir(parents=True, exist_ok=True)
    dest = weights_dir / "model"
    tmp = Path(tempfile.mkdtemp(dir=weights_dir, prefix=".model.shipping."))
    try:
        if bases is None:
            shutil.copytree(src.vlm, tmp / "vlm")
            shutil.copytree(src.sdxl, tmp / "sdxl")
        else:
            rel = {}
            for part, trained in (("vlm", src.vlm), ("sdxl", src.sdxl)):
                base = Path(bases[part]).resolve()
                _check_same_tensors(trained, base)
                rel[part] = os.path.relpath(base, dest)
            (tmp / BASES_FILE).write_text(json.dumps(rel, indent=1) + "\n")
        shutil.copy2(src.bundle, tmp / "mumu.safetensors")
        if fp16:
            for p in sorted(tmp.rglob("*.safetensors")):
                _to_fp16_safetensors(p)
        from ..bundle import apply_umask_tree

        apply_umask_tree(tmp)  # readable by others, as the umask allows (mkdtemp gives 0700)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record = {
        "format": "MUMU-mini model: the trainer's export layout (vlm/, sdxl/, mumu.safetensors)"
        if bases is None
        else f"MUMU-mini model: mumu.safetensors on the base folders named in {BASES_FILE}",
        "source_export": str(export_dir),
        "dtype": "float16" if fp16 else "float32",
        "hardware": _hardware(),
        **(info or {}),
        "files": file_hashes(dest),
    }
    if bases is not None:
        paths = model_paths(dest)
        record["base_files"] = {"vlm": file_hashes(paths.vlm), "sdxl": file_hashes(paths.sdxl)}
    (weights_dir / "model.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _trained_bases(export_dir: Path) -> tuple[Path, Path]:
    """The VLM and SDXL folders an export was trained on: its own copies, else its run's config."""
    if (export_dir / "vlm").is_dir() and (export_dir / "sdxl").is_dir():
        return export_dir / "vlm", export_dir / "sdxl"
    cfg = export_dir.parent.parent / "config.json"
    if not cfg.is_file():
        raise MiniModelError(
            f"{export_dir} holds no vlm/ and sdxl/ and {cfg} is missing: cannot tell which bases it was trained on"
        )
    model = json.loads(cfg.read_text())["model"]
    return Path(model["vlm"]), Path(model["sdxl"])


def _check_same_tensors(trained: Path, base: Path) -> None:
    """Every safetensors tensor under ``trained`` equals the one at the same path and key under ``base``."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(trained) for p in trained.rglob("*.safetensors"))
    if not files:
        raise MiniModelError(f"{trained} holds no safetensors files")
    for rel in files:
        if not (base / rel).is_file():
            raise MiniModelError(f"base folder {base} lacks {rel}: the export was not trained on it")
        a, b = load_file(str(trained / rel)), load_file(str(base / rel))
        bad = [
            k for k in a if k not in b or a[k].shape != b[k].shape or not (a[k].float() == b[k].float()).all()
        ]
        if bad or set(a) != set(b):
            raise MiniModelError(
                f"{trained / rel} differs from the base {base / rel} (e.g. {bad[:2]}): the export was not "
                "trained on this base (or trained it fully); ship it without bases"
            )


# ------------------------------------------------------------------------------------------ demo assets


@dataclass(frozen=True)
class DemoPrompt:
    name: str
    text: str  # with <image> placeholders, in image order
    images: tuple[str, ...]  # file names under the demo folder
    note: str  # what the references show and where they come from
    # Ground truth per image (what it shows), in image order; never for the model's eyes.
    references: tuple[Reference, ...]
    sources: tuple[str, ...]  # per image: the file name of the render it was cut from
    n_objects: int  # objects the caption names

    @property
    def plain_text(self) -> str:
        """The text-only prompt's words (what ``InterleavedPrompt.without_images()`` keeps)."""
        return " ".join("".join(self.text.split("<image>")).split())

    @property
    def kind(self) -> str:
        n_obj = sum(r.kind == "object" for r in self.references)
        has_style = any(r.kind == "style" for r in self.references)
        if has_style:
            return "object + style" if n_obj else "style"
        return "two objects" if n_obj == 2 else "one object"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text": self.text,
            "images": list(self.images),
            "note": self.note,
            "references": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.references],
            "sources": list(self.sources),
            "n_objects": self.n_objects,
        }

    def to_mini_prompt(self, folder: str | Path = DEMO_DIR, tokens_per_image: int = 16) -> MiniPrompt:
        """The evaluation harness's prompt (images loaded, ground truth attached), e.g. for its oracle."""
        images = tuple(Image.open(Path(folder) / f).convert("RGB") for f in self.images)
        return MiniPrompt(self.text, images, self.references, self.n_objects, tokens_per_image)


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
    ``prompts.json`` records each reference's ground truth (taken from its source scene).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prompts: list[DemoPrompt] = []
    index = _DEMO_BASE
    for name, words, objects, bg_style in _demo_specs():
        files: list[str] = []
        sources: list[str] = []
        refs: list[Reference] = []
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
            sources.append(f"{base}_source.png")
            inserts.append((spans[k][0], ""))
            o = src.objects[0]
            refs.append(Reference("object", colour=o.colour, shape=o.shape))
            notes.append(f"crop of a {o.colour} {o.shape} from eval scene {index - 1}")
        if bg_style is not None:
            src = scene_at("eval", index, DEFAULT_WORLD, n_objects=1, style=bg_style, require_style_box=True)
            index += 1
            base = f"{name}_bg"
            render(src).save(out / f"{base}_source.png")
            style_reference(src).save(out / f"{base}.png")
            files.append(f"{base}.png")
            sources.append(f"{base}_source.png")
            inserts.append((bg_span[0], ""))
            refs.append(Reference("style", style=src.background.style))
            notes.append(f"background patch ({bg_style}) of eval scene {index - 1}")
        prompts.append(
            DemoPrompt(
                name,
                interleave(caption, inserts, sep=""),
                tuple(files),
                "; ".join(notes),
                tuple(refs),
                tuple(sources),
                len(word_list),
            )
        )
    (out / "prompts.json").write_text(json.dumps([p.to_json() for p in prompts], indent=2) + "\n")
    return prompts


def _reference_from_json(d: dict[str, Any], where: str) -> Reference:
    kind = d.get("kind")
    if kind == "object" and d.get("colour") in COLOURS and d.get("shape") in SHAPES:
        return Reference("object", colour=d["colour"], shape=d["shape"])
    if kind == "style" and d.get("style") in STYLES:
        return Reference("style", style=d["style"])
    raise MiniModelError(
        f"{where}: bad reference {d}; expected {{'kind': 'object', 'colour': one of {COLOURS}, 'shape': one "
        f"of {SHAPES}}} or {{'kind': 'style', 'style': one of {STYLES}}}"
    )


def load_demo_prompts(folder: str | Path = DEMO_DIR) -> list[DemoPrompt]:
    folder = Path(folder)
    path = folder / "prompts.json"
    if not path.is_file():
        raise MiniModelError(
            f"{path} is missing: run `python -m mumu_core.mini demo-assets` to write the demo"
        )
    out = []
    for d in json.loads(path.read_text()):
        where = f"{path}, prompt {d.get('name')!r}"
        if "references" not in d or len(d["references"]) != len(d.get("images", ())):
            raise MiniModelError(
                f"{where}: needs 'references' (what each image shows, one per image) for the demo's marks; "
                "rewrite the bundled prompts with `python -m mumu_core.mini demo-assets`"
            )
        refs = tuple(_reference_from_json(r, where) for r in d["references"])
        sources = tuple(d.get("sources", ()))
        p = DemoPrompt(
            d["name"], d["text"], tuple(d["images"]), d.get("note", ""), refs, sources, int(d["n_objects"])
        )
        if p.text.count("<image>") != len(p.images):
            raise MiniModelError(
                f"{where}: {p.text!r} has {p.text.count('<image>')} placeholders for {len(p.images)} images"
            )
        missing = [f for f in p.images + p.sources if not (folder / f).is_file()]
        if missing:
            raise MiniModelError(f"demo prompt {p.name!r}: images {missing} are missing in {folder}")
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------ marks


@dataclass(frozen=True)
class ObjectMark:
    """One object reference against what the analyser found for it in a sample (None: no object found)."""

    expected: tuple[str, str]  # (colour, shape) the reference shows
    found: tuple[str, str] | None

    @property
    def colour_ok(self) -> bool:
        return self.found is not None and self.found[0] == self.expected[0]

    @property
    def shape_ok(self) -> bool:
        return self.found is not None and self.found[1] == self.expected[1]


@dataclass(frozen=True)
class StyleMark:
    expected: str
    found: str

    @property
    def ok(self) -> bool:
        return self.found == self.expected


@dataclass(frozen=True)
class SampleMark:
    """A sample judged against its prompt's references: one mark per object reference, and the style."""

    objects: tuple[ObjectMark, ...]
    style: StyleMark | None

    @property
    def all_right(self) -> bool:
        return all(o.colour_ok and o.shape_ok for o in self.objects) and (self.style is None or self.style.ok)

    def to_json(self) -> dict[str, Any]:
        return {
            "objects": [
                {
                    "expected": " ".join(o.expected),
                    "found": " ".join(o.found) if o.found else None,
                    "colour_ok": o.colour_ok,
                    "shape_ok": o.shape_ok,
                }
                for o in self.objects
            ],
            "style": None
            if self.style is None
            else {"expected": self.style.expected, "found": self.style.found, "ok": self.style.ok},
            "all_right": self.all_right,
        }


def assign_objects(expected: Sequence[tuple[str, str]], found: Sequence[tuple[str, str]]) -> list[int | None]:
    """For each expected (colour, shape), the index of the found object it is judged against (None: not
    enough objects found). The one-to-one assignment with the most matching attributes, colour breaking
    ties: the rule of the evaluation's pair suite (``evaluate._pair_score``), so counts agree with it."""
    best: tuple[int, int] | None = None
    best_perm: tuple[int, ...] = ()
    k = min(len(found), len(expected))
    for perm in itertools.permutations(range(len(found)), k):
        c = sum(found[p][0] == expected[j][0] for j, p in enumerate(perm))
        s = sum(found[p][1] == expected[j][1] for j, p in enumerate(perm))
        if best is None or (c + s, c) > (best[0] + best[1], best[0]):
            best, best_perm = (c, s), perm
    return list(best_perm) + [None] * (len(expected) - k)


def mark_found(
    references: Sequence[Reference], found: Sequence[tuple[str, str]], found_style: str
) -> SampleMark:
    """Judge what was seen in a sample (its objects' (colour, shape), largest first, and its background
    style) against the references."""
    expected = [(str(r.colour), str(r.shape)) for r in references if r.kind == "object"]
    found = list(found[: len(expected)])
    picks = assign_objects(expected, found)
    objects = tuple(
        ObjectMark(e, None if p is None else found[p]) for e, p in zip(expected, picks, strict=True)
    )
    styles = [str(r.style) for r in references if r.kind == "style"]
    return SampleMark(objects, StyleMark(styles[0], found_style) if styles else None)


def mark_sample(references: Sequence[Reference], analysis: Analysis) -> SampleMark:
    """Judge one analysed sample against the references. As in the evaluation, the largest detections
    (as many as there are object references) are the sample's objects."""
    return mark_found(references, [(d.colour, d.shape) for d in analysis.detections], analysis.style)


def mark_samples(
    analyser: Analyser, references: Sequence[Reference], images: Sequence[Image.Image]
) -> list[SampleMark]:
    return [mark_sample(references, a) for a in analyser.analyse(images, max_objects=2)]


@dataclass(frozen=True)
class Agreement:
    """How many samples agree with their references: colour/shape counted per object reference (out of
    ``objects``), style per sample with a style reference (out of ``styled``)."""

    colour: float
    shape: float
    objects: int
    style: float
    styled: int
    all_right: float
    samples: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def agreement(marks: Sequence[SampleMark]) -> Agreement:
    objs = [o for m in marks for o in m.objects]
    styled = [m.style for m in marks if m.style is not None]
    return Agreement(
        colour=sum(o.colour_ok for o in objs),
        shape=sum(o.shape_ok for o in objs),
        objects=len(objs),
        style=sum(s.ok for s in styled),
        styled=len(styled),
        all_right=sum(m.all_right for m in marks),
        samples=len(marks),
    )


def chance_agreement(
    prompts: Sequence[DemoPrompt], samples: int, draws: int = 2000, seed: int = 0
) -> Agreement:
    """Expected agreement of a renderer that draws every attribute uniformly at random (the same marking
    rule; Monte Carlo for the assignment of two objects). Counts are expectations, not integers."""
    rng = np.random.default_rng([seed, 11])
    colour = shape = style = all_right = 0.0
    for p in prompts:
        n_obj = sum(r.kind == "object" for r in p.references)
        for _ in range(draws):
            found = [
                (COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
                for _ in range(n_obj)
            ]
            m = mark_found(p.references, found, STYLES[int(rng.integers(len(STYLES)))])
            w = samples / draws  # each draw stands for this many of the prompt's samples
            colour += sum(o.colour_ok for o in m.objects) * w
            shape += sum(o.shape_ok for o in m.objects) * w
            style += (m.style is not None and m.style.ok) * w
            all_right += m.all_right * w
    n_objects = sum(r.kind == "object" for p in prompts for r in p.references) * samples
    n_styled = sum(any(r.kind == "style" for r in p.references) for p in prompts) * samples
    return Agreement(colour, shape, n_objects, style, n_styled, all_right, len(prompts) * samples)


# ------------------------------------------------------------------------------------------ the sheet

RIGHT = (70, 200, 90)
WRONG = (230, 70, 70)
NEUTRAL = (225, 225, 225)
DIM = (150, 150, 150)
BACKDROP = (24, 24, 24)
HEADERS = ("references", "samples", "text-only")
LEGEND = (  # (mark, colour, text) lines under the title
    (True, RIGHT, "green border / word: the analyser sees what the reference in the same row shows"),
    (False, WRONG, "red: it sees something else; the words under a sample are what it sees"),
)
SUBHEADERS = (
    "held-out images, named by what they show",
    "the prompt with its references",
    "same words and seeds, image tokens removed",
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable FreeType font
    except TypeError:  # older Pillow: only the fixed bitmap font exists (smaller, still legible)
        return ImageFont.load_default()


@dataclass(frozen=True)
class SheetLayout:
    """Geometry of the demo's contact sheet; the sheet and its tests both read it from here.

    Top: title, legend and measured agreement (``top_h``), then the column headers (``header_h``). Then one
    row per prompt: the prompt's words (``prompt_h``), the image tiles (``side`` px, the 24 px images
    enlarged ``scale`` times, nearest neighbour) and the words under each tile (``label_h``). Columns come
    in three groups, ``HEADERS``: references | samples | text-only.
    """

    n_refs: int
    n_samples: int
    n_rows: int
    canvas: int = DEFAULT_WORLD.canvas
    scale: int = 6
    gap: int = 10  # between tiles of a group (a sample's coloured border sits inside it)
    group_gap: int = 28
    margin: int = 14
    border: int = 4
    top_lines: int = 2  # lines of measured agreement under the title and legend (wrapped summary)
    header_h: int = 46
    prompt_h: int = 24
    label_h: int = 44
    row_gap: int = 14
    min_group_tiles: int = 2  # a group is at least this many tiles wide, so its header fits
    font_size: int = 14
    title_size: int = 20

    @property
    def side(self) -> int:
        return self.canvas * self.scale

    @property
    def line_h(self) -> int:
        return self.font_size + 6

    @property
    def top_h(self) -> int:
        """Title, the legend's lines and ``top_lines`` lines of agreement, then a blank line."""
        return self.margin + self.title_size + 10 + (len(LEGEND) + self.top_lines + 1) * self.line_h

    def group_width(self, n_tiles: int) -> int:
        n = max(n_tiles, self.min_group_tiles)
        return n * self.side + (n - 1) * self.gap

    @property
    def group_x(self) -> tuple[int, int, int]:
        """Left edge of each column group: references, samples, text-only."""
        refs = self.margin
        samples = refs + self.group_width(self.n_refs) + self.group_gap
        text_only = samples + self.group_width(self.n_samples) + self.group_gap
        return refs, samples, text_only

    def tile_x(self, group: int, k: int) -> int:
        return self.group_x[group] + k * (self.side + self.gap)

    @property
    def row_h(self) -> int:
        return self.prompt_h + self.side + self.label_h + self.row_gap

    def row_y(self, i: int) -> int:
        """Top of row ``i`` (its prompt line); its tiles start ``prompt_h`` lower."""
        return self.top_h + self.header_h + i * self.row_h

    def tile_y(self, i: int) -> int:
        return self.row_y(i) + self.prompt_h

    @property
    def size(self) -> tuple[int, int]:
        width = self.group_x[2] + self.group_width(self.n_samples) + self.margin
        return width, self.row_y(self.n_rows)


@dataclass(frozen=True)
class SheetRow:
    prompt: DemoPrompt
    references: Sequence[Image.Image]
    samples: Sequence[Image.Image]
    sample_marks: Sequence[SampleMark]
    text_only: Sequence[Image.Image]
    text_only_marks: Sequence[SampleMark]


def _draw_mark(draw: ImageDraw.ImageDraw, x: int, y: int, size: int, ok: bool) -> None:
    """A drawn check (right) or cross (wrong): the default font has no such glyphs."""
    w = max(2, size // 6)
    if ok:
        draw.line(
            [(x, y + size * 0.55), (x + size * 0.38, y + size * 0.9), (x + size, y + size * 0.1)],
            fill=RIGHT,
            width=w,
            joint="curve",
        )
    else:
        draw.line([(x + 1, y + 1), (x + size - 1, y + size - 1)], fill=WRONG, width=w)
        draw.line([(x + 1, y + size - 1), (x + size - 1, y + 1)], fill=WRONG, width=w)


def _words(draw: ImageDraw.ImageDraw, x: int, y: int, parts: Sequence[tuple[str, tuple]], font) -> int:
    """Draw (text, colour) parts one after another; returns the x after the last."""
    for text, colour in parts:
        draw.text((x, y), text, fill=colour, font=font)
        x += round(draw.textlength(text, font=font))
    return x


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _tile(im: Image.Image, side: int, scale: int) -> Image.Image:
    """The image enlarged ``scale`` times (nearest neighbour) centred on a black tile of ``side`` px:
    a reference crop smaller than the canvas keeps its true size relative to the samples."""
    im = im.convert("RGB")
    f = min(scale, side / max(im.size))
    im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.NEAREST)
    tile = Image.new("RGB", (side, side), (0, 0, 0))
    tile.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return tile


def reference_label(ref: Reference) -> str:
    return f"{ref.colour} {ref.shape}" if ref.kind == "object" else f"{ref.style} background"


def _mark_lines(mark: SampleMark) -> list[tuple[list[tuple[str, tuple]], bool]]:
    """Per line: coloured words (each attribute green if it matches its reference, red if not), overall ok."""
    lines = []
    for o in mark.objects:
        if o.found is None:
            lines.append(([("no object found", WRONG)], False))
        else:
            parts = [
                (o.found[0], RIGHT if o.colour_ok else WRONG),
                (" ", NEUTRAL),
                (o.found[1], RIGHT if o.shape_ok else WRONG),
            ]
            lines.append((parts, o.colour_ok and o.shape_ok))
    if mark.style is not None:
        lines.append(([(f"{mark.style.found} bg", RIGHT if mark.style.ok else WRONG)], mark.style.ok))
    return lines


def _agreement_text(a: Agreement, verbose: bool = False) -> str:
    parts = []
    if a.objects:
        if verbose:
            parts += [f"colour in {a.colour:g}/{a.objects} objects", f"shape in {a.shape:g}/{a.objects}"]
        else:
            parts += [f"colour {a.colour:g}/{a.objects}", f"shape {a.shape:g}/{a.objects}"]
    if a.styled:
        parts.append(
            f"background style in {a.style:g}/{a.styled} samples"
            if verbose
            else f"style {a.style:g}/{a.styled}"
        )
    return ", ".join(parts)


def _sheet_notes(summary: Sequence[str], layout: SheetLayout) -> list[str]:
    """The summary's agreement lines (all but the first, which names the sheet) wrapped to the sheet."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = layout.size[0] - 2 * layout.margin
    return [w for text in summary[1:] for w in _wrap(draw, text, _font(layout.font_size), width)]


def sheet_layout(n_refs: int, n_samples: int, n_rows: int, summary: Sequence[str]) -> SheetLayout:
    """The layout :func:`contact_sheet` draws with: at most ``n_refs`` references and ``n_samples``
    samples per row, ``n_rows`` prompts, ``summary`` (the demo's three lines) under the title."""
    layout = SheetLayout(n_refs, n_samples, n_rows)
    return replace(layout, top_lines=len(_sheet_notes(summary, layout)))


def contact_sheet(rows: Sequence[SheetRow], summary: Sequence[str]) -> Image.Image:
    """The demo's sheet: headers references | samples | text-only; every reference named by what it shows;
    every sample bordered green (all its references' attributes seen) or red, with the analysed words."""
    layout = sheet_layout(
        max((len(r.references) for r in rows), default=0),
        max((len(r.samples) for r in rows), default=0),
        len(rows),
        summary,
    )
    font, small, big = _font(layout.font_size), _font(layout.font_size - 2), _font(layout.title_size)
    sheet = Image.new("RGB", layout.size, BACKDROP)
    draw = ImageDraw.Draw(sheet)
    side, m = layout.side, layout.margin
    line = layout.line_h

    # Title, legend, the measured agreement.
    y = m
    draw.text(
        (m, y), "MUMU-mini demo: does the model draw what its reference images show?", fill=NEUTRAL, font=big
    )
    y += layout.title_size + 10
    for ok, colour, text in LEGEND:
        _draw_mark(draw, m, y + 3, layout.font_size - 4, ok)
        _words(draw, m + layout.font_size + 2, y, [(text, colour)], font)
        y += line
    for text in _sheet_notes(summary, layout):
        draw.text((m, y), text, fill=NEUTRAL, font=font)
        y += line

    # Column headers.
    y = layout.top_h
    for g, n in enumerate((layout.n_refs, layout.n_samples, layout.n_samples)):
        x0, w = layout.group_x[g], layout.group_width(n)
        draw.text((x0, y), HEADERS[g], fill=NEUTRAL, font=big)
        draw.text(
            (x0, y + layout.title_size + 4), _wrap(draw, SUBHEADERS[g], small, w)[0], fill=DIM, font=small
        )
        draw.line(
            [(x0, layout.top_h + layout.header_h - 6), (x0 + w, layout.top_h + layout.header_h - 6)], fill=DIM
        )

    for i, row in enumerate(rows):
        p = row.prompt
        y = layout.row_y(i)
        draw.text((layout.group_x[0], y + 2), f'"{p.text}"   ({p.kind})', fill=NEUTRAL, font=font)
        draw.text((layout.group_x[2], y + 2), f'"{p.plain_text}"', fill=DIM, font=font)
        ty = layout.tile_y(i)
        for k, (im, ref) in enumerate(zip(row.references, p.references, strict=True)):
            x = layout.tile_x(0, k)
            sheet.paste(_tile(im, side, layout.scale), (x, ty))
            draw.text((x, ty + side + 4), reference_label(ref), fill=NEUTRAL, font=font)
        for g, images, marks in ((1, row.samples, row.sample_marks), (2, row.text_only, row.text_only_marks)):
            for k, (im, mark) in enumerate(zip(images, marks, strict=True)):
                x = layout.tile_x(g, k)
                b = layout.border
                draw.rectangle(
                    (x - b, ty - b, x + side + b - 1, ty + side + b - 1),
                    fill=RIGHT if mark.all_right else WRONG,
                )
                sheet.paste(_tile(im, side, layout.scale), (x, ty))
                ly = ty + side + b + 2
                for parts, ok in _mark_lines(mark):
                    end = _words(draw, x, ly, parts, font)
                    _draw_mark(draw, end + 5, ly + 3, layout.font_size - 4, ok)
                    ly += layout.font_size + 4
    return sheet


# ------------------------------------------------------------------------------------------------ demo


@dataclass(frozen=True)
class DemoResult:
    files: list[Path]  # every PNG written
    summary: list[str]  # the three lines printed and written to summary.txt
    report: dict[str, Any]  # summary.json


def _settings_text(settings: dict[str, Any]) -> str:
    shown = [f"{k} {settings[k]:g}" for k in ("seed", "guidance", "steps") if k in settings]
    return f" ({', '.join(shown)})" if shown else ""


def summarise(
    rows: Sequence[SheetRow], sheet: str | Path, settings: dict[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """The demo's three-line summary (what is shown and where; agreement with references; text-only) and
    the summary.json payload with the counts and every sample's marks."""
    prompts = [r.prompt for r in rows]
    n_samples = max((len(r.samples) for r in rows), default=0)
    with_refs = agreement([m for r in rows for m in r.sample_marks])
    text_only = agreement([m for r in rows for m in r.text_only_marks])
    chance = chance_agreement(prompts, n_samples)
    kinds: dict[str, int] = {}
    for p in prompts:
        kinds[p.kind] = kinds.get(p.kind, 0) + 1
    kinds_text = ", ".join(f"{n} {k}" for k, n in kinds.items())
    gain = []
    if with_refs.objects:
        gain += [
            f"colour {with_refs.colour - text_only.colour:+g}",
            f"shape {with_refs.shape - text_only.shape:+g}",
        ]
    if with_refs.styled:
        gain.append(f"style {with_refs.style - text_only.style:+g}")
    chance_text = ", ".join(
        ([f"{chance.colour:.1f}", f"{chance.shape:.1f}"] if chance.objects else [])
        + ([f"{chance.style:.1f}"] if chance.styled else [])
    )
    lines = [
        f"MUMU-mini demo: {len(prompts)} prompts with held-out reference images ({kinds_text}), "
        f"{n_samples} samples each with the references and {n_samples} text-only{_settings_text(settings)}; "
        f"sheet: {sheet}",
        f"with references: the analyser sees the referenced {_agreement_text(with_refs, verbose=True)} "
        f"({with_refs.all_right}/{with_refs.samples} samples entirely right)",
        f"text-only (same words and seeds, image tokens removed): {_agreement_text(text_only)} "
        f"(random attributes: {chance_text}), so the references add {', '.join(gain)}",
    ]
    report = {
        "summary": lines,
        "contact_sheet": str(sheet),
        "settings": settings,
        "with_references": with_refs.to_json(),
        "text_only": text_only.to_json(),
        "chance": chance.to_json(),
        "prompts": [
            {
                "name": r.prompt.name,
                "text": r.prompt.text,
                "text_only": r.prompt.plain_text,
                "references": [reference_label(x) for x in r.prompt.references],
                "samples": [m.to_json() for m in r.sample_marks],
                "text_only_samples": [m.to_json() for m in r.text_only_marks],
            }
            for r in rows
        ],
    }
    return lines, report


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run_demo(
    out: str | Path,
    model: str | Path = MODEL_DIR,
    demo: str | Path = DEMO_DIR,
    samples: int = 4,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    verify: bool = True,
) -> DemoResult:
    """Generate ``samples`` images per bundled prompt with the mini model, and as many from the same prompt
    with its image tokens removed (same seeds); judge every image with the analyser against the prompt's
    references. Writes ``<name>_<k>.png`` / ``<name>_textonly_<k>.png`` (24 x 24, as generated) with
    ``_x8`` enlargements, ``contact_sheet.png``, ``summary.txt`` (three lines) and ``summary.json``."""
    import torch
    from tqdm import tqdm

    from ..pipeline import MumuPipeline
    from ..prompt import InterleavedPrompt

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if verify and Path(model) == MODEL_DIR:
        verify_model(model)
    paths = model_paths(model)
    prompts = load_demo_prompts(demo)
    try:
        analyser = Analyser.load()
    except AnalyserError as e:  # the CLI reports model-file problems as usage errors (exit 2)
        raise MiniModelError(str(e)) from e
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = MumuPipeline.from_paths(paths.vlm, paths.bundle, paths.sdxl, dtype=torch.float32, device="cpu")
    written: list[Path] = []
    rows: list[SheetRow] = []
    text_only_cache: dict[str, list[Image.Image]] = {}

    def save(images: Sequence[Image.Image], stem: str) -> None:
        for k, im in enumerate(images):
            for suffix, img in (("", im), ("_x8", im.resize((im.width * 8, im.height * 8), Image.NEAREST))):
                path = out / f"{stem}_{k}{suffix}.png"
                _atomic_write(path, lambda t, img=img: img.save(t, format="PNG"))
                written.append(path)

    for p in tqdm(prompts, desc="demo (with references, then text-only)"):
        refs = [Image.open(Path(demo) / f).convert("RGB") for f in p.images]
        ip = InterleavedPrompt.parse(p.text, refs, tokens_per_image=pipe.preset.tokens_per_image)
        kw = dict(seed=seed, steps=steps, guidance=guidance, batch=samples, progress=False)
        images = pipe([ip], **kw)
        # The same words with the same seeds give the same images: prompts that differ only in their
        # references share one text-only generation (5 instead of 9 for the bundled prompts).
        if ip.plain_text not in text_only_cache:
            text_only_cache[ip.plain_text] = pipe([ip.without_images()], **kw)
        text_only = text_only_cache[ip.plain_text]
        save(images, p.name)
        save(text_only, f"{p.name}_textonly")
        rows.append(
            SheetRow(
                p,
                refs,
                images,
                mark_samples(analyser, p.references, images),
                text_only,
                mark_samples(analyser, p.references, text_only),
            )
        )
    s = pipe.settings(steps, guidance, None, None, samples)
    settings = {
        "samples": samples,
        "seed": seed,
        "steps": s.steps,
        "guidance": s.guidance,
        "model": str(model),
    }
    sheet = out / "contact_sheet.png"
    lines, report = summarise(rows, sheet, settings)
    _atomic_write(sheet, lambda t: contact_sheet(rows, lines).save(t, format="PNG"))
    written.append(sheet)
    _atomic_write(out / "summary.txt", lambda t: t.write_text("\n".join(lines) + "\n"))
    _atomic_write(out / "summary.json", lambda t: t.write_text(json.dumps(report, indent=2) + "\n"))
    return DemoResult(written, lines, report)
