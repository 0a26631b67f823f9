"""The MUMU-mini analyser: finds the objects in a (generated) mini-world image and classifies them.

Localisation is classical and transparent: object colours are saturated and backgrounds are not (see
world.py), so foreground = saturation/value threshold, objects = 8-connected components (split by hue when a
component holds two clearly different hues, e.g. two touching objects). Classification is learned: a small
CNN looks at each component's crop (RGB + the component's mask) and predicts colour and shape; a second small
CNN looks at the whole image and predicts the background style. Both are trained on ground-truth renders with
blur/noise augmentation (so they stay reliable on slightly soft generated images) in about a minute on CPU.

Train (the shipped weights were made by exactly this command, see weights/analyser.json):
    python -m mumu_core.mini.analyser train
Check the shipped weights on held-out ground truth:
    python -m mumu_core.mini.analyser check
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn
from tqdm import tqdm

from ..cli_help import first_line
from .world import (
    COLOUR_HUES,
    COLOURS,
    DEFAULT_WORLD,
    SHAPES,
    STYLES,
    Box,
    Scene,
    WorldConfig,
    render,
    scene_at,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "analyser.safetensors"
TRAIN_COMMAND = "python -m mumu_core.mini.analyser train"

CROP = 16  # side of the object classifier's input
MIN_SAT = 0.45  # object colours have saturation >= 0.8, backgrounds <= 0.22
MIN_VAL = 0.25
MIN_AREA = 6  # pixels; the smallest ground-truth object (8 px triangle) covers ~30


class AnalyserError(RuntimeError):
    """Analyser weights missing or inconsistent, or bad input images."""


# ------------------------------------------------------------------------------------------ localisation


@dataclass(frozen=True)
class Component:
    mask: np.ndarray  # (H, W) bool
    box: Box  # tight pixel box [x0, y0, x1, y1)
    area: int


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(d, 1e-6)
    h = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    return h * 60.0, s, mx


def foreground(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels saturated and bright enough to belong to an object."""
    _, s, v = _hsv(rgb)
    return (s >= MIN_SAT) & (v >= MIN_VAL)


def hue_labels(rgb: np.ndarray) -> np.ndarray:
    """(H, W) index of the nearest colour class hue."""
    h, _, _ = _hsv(rgb)
    centres = np.asarray([COLOUR_HUES[c] for c in COLOURS], dtype=np.float32)
    d = np.abs(h[..., None] - centres)
    d = np.minimum(d, 360.0 - d)
    return d.argmin(-1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a small bool mask (pure numpy/python BFS; images are <= 64 px)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist(), strict=True):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(comp)
    return out


def _box(mask: np.ndarray) -> Box:
    ys, xs = np.nonzero(mask)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def segment(rgb: np.ndarray, min_area: int = MIN_AREA) -> list[Component]:
    """Object components of an (H, W, 3) uint8 image, largest first."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise AnalyserError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    fg = foreground(rgb)
    labels = hue_labels(rgb)
    n = len(COLOURS)
    comps: list[np.ndarray] = []
    for comp in _components(fg):
        counts = np.bincount(labels[comp], minlength=n)
        order = np.argsort(-counts)
        a, b = int(order[0]), int(order[1])
        circ = min(abs(a - b), n - abs(a - b))
        # Two clearly different hues, each object-sized: two touching objects, split them by hue.
        # Neighbouring hues (circ == 1) are one object whose colour drifted, never split those.
        if circ >= 2 and counts[b] >= max(min_area, 0.2 * comp.sum()):
            for k in (a, b):
                comps.extend(_components(comp & (labels == k)))
        else:
            comps.append(comp)
    result = [Component(c, _box(c), int(c.sum())) for c in comps if c.sum() >= min_area]
    result.sort(key=lambda c: -c.area)
    return result


def component_input(rgb: np.ndarray, comp: Component, margin: int = 1) -> np.ndarray:
    """The classifier input for one component: (4, CROP, CROP) float32 = RGB in [0, 1] + its mask."""
    x0, y0, x1, y1 = comp.box
    side = max(x1 - x0, y1 - y0) + 2 * margin
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    crop_box = (
        int(round(cx - side / 2)),
        int(round(cy - side / 2)),
        int(round(cx - side / 2)) + side,
        int(round(cy - side / 2)) + side,
    )
    img = Image.fromarray(rgb, mode="RGB").crop(crop_box).resize((CROP, CROP), Image.BILINEAR)
    m = (
        Image.fromarray(comp.mask.astype(np.uint8) * 255, mode="L")
        .crop(crop_box)
        .resize((CROP, CROP), Image.BILINEAR)
    )
    x = np.concatenate(
        [np.asarray(img, np.float32) / 255.0, np.asarray(m, np.float32)[..., None] / 255.0], -1
    )
    return x.transpose(2, 0, 1).copy()


def style_input(rgb: np.ndarray, canvas: int) -> np.ndarray:
    """The style classifier input: (4, canvas, canvas) float32 = RGB in [0, 1] + foreground mask."""
    fg = foreground(rgb).astype(np.float32)[..., None]
    x = np.concatenate([rgb.astype(np.float32) / 255.0, fg], -1)
    return x.transpose(2, 0, 1).copy()


# --------------------------------------------------------------------------------------------- networks


class ObjectNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),  # 8x8
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1),  # 4x4
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48 * 16, 96),
            nn.ReLU(),
        )
        self.colour = nn.Linear(96, len(COLOURS))
        self.shape = nn.Linear(96, len(SHAPES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.colour(h), self.shape(h)


class StyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(4, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 48, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        # Mean and max pooling: textures show up as high max response, gradients as spatial variation.
        self.head = nn.Linear(96 + 3, len(STYLES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        # Background brightness spread (over background pixels only) separates flat from the two-tone styles.
        bg = 1.0 - x[:, 3:4]
        n = bg.sum((2, 3)).clamp_min(1.0)
        mean = (x[:, :3] * bg).sum((2, 3)) / n
        var = (((x[:, :3] - mean[..., None, None]) ** 2) * bg).sum((2, 3)) / n
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3)), var.sqrt()], 1))


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Detection:
    box: Box
    area: int
    colour_probs: np.ndarray  # (len(COLOURS),)
    shape_probs: np.ndarray  # (len(SHAPES),)

    @property
    def colour(self) -> str:
        return COLOURS[int(self.colour_probs.argmax())]

    @property
    def shape(self) -> str:
        return SHAPES[int(self.shape_probs.argmax())]


@dataclass(frozen=True)
class Analysis:
    detections: tuple[Detection, ...]  # largest first
    style_probs: np.ndarray  # (len(STYLES),)

    @property
    def style(self) -> str:
        return STYLES[int(self.style_probs.argmax())]


@dataclass(frozen=True)
class Prediction:
    """Per image: the largest object's colour/shape probabilities (zeros where none was found)."""

    colour_probs: np.ndarray  # (B, len(COLOURS))
    shape_probs: np.ndarray  # (B, len(SHAPES))
    style_probs: np.ndarray  # (B, len(STYLES))
    found: np.ndarray  # (B,) bool


class Analyser:
    def __init__(
        self, object_net: ObjectNet, style_net: StyleNet, canvas: int, meta: dict | None = None
    ) -> None:
        self.object_net = object_net.eval()
        self.style_net = style_net.eval()
        self.canvas = canvas
        self.meta = meta or {}

    @classmethod
    def untrained(cls, canvas: int = DEFAULT_WORLD.canvas, seed: int = 0) -> Analyser:
        torch.manual_seed(seed)
        return cls(ObjectNet(), StyleNet(), canvas)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_WEIGHTS) -> Analyser:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise AnalyserError(
                f"analyser weights not found at {path}; they ship with the repository "
                f"(mumu_core/mini/weights/analyser.safetensors) and are rebuilt by `{TRAIN_COMMAND}`"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        config = json.loads(meta.get("mumu_mini.analyser", "{}"))
        if config.get("colours") != list(COLOURS) or config.get("shapes") != list(SHAPES):
            raise AnalyserError(
                f"{path} was trained for colours/shapes {config.get('colours')}/{config.get('shapes')}, "
                f"the world has {list(COLOURS)}/{list(SHAPES)}; retrain with `{TRAIN_COMMAND}`"
            )
        sd = load_file(str(path))
        analyser = cls(ObjectNet(), StyleNet(), int(config["canvas"]), config)
        analyser.object_net.load_state_dict(
            {k[len("object.") :]: v.float() for k, v in sd.items() if k.startswith("object.")}
        )
        analyser.style_net.load_state_dict(
            {k[len("style.") :]: v.float() for k, v in sd.items() if k.startswith("style.")}
        )
        return analyser

    def save(self, path: str | Path, extra: dict | None = None) -> str:
        """Save as fp16 safetensors (< 1 MB); returns the file's sha256."""
        from safetensors.torch import save_file

        sd = {f"object.{k}": v.detach().half().contiguous() for k, v in self.object_net.state_dict().items()}
        sd.update(
            {f"style.{k}": v.detach().half().contiguous() for k, v in self.style_net.state_dict().items()}
        )
        config = {
            "canvas": self.canvas,
            "colours": list(COLOURS),
            "shapes": list(SHAPES),
            "styles": list(STYLES),
            "crop": CROP,
            **(extra or {}),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata={"mumu_mini.analyser": json.dumps(config)})
        self.meta = config
        return hashlib.sha256(path.read_bytes()).hexdigest()

    # -------------------------------------------------------------------------------------- inference

    def _as_array(self, image: Image.Image | np.ndarray) -> np.ndarray:
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise AnalyserError(f"expected uint8 (H, W, 3) arrays, got {image.dtype} {image.shape}")
            image = Image.fromarray(image, mode="RGB")
        if not isinstance(image, Image.Image):
            raise AnalyserError(f"expected PIL images or uint8 arrays, got {type(image).__name__}")
        image = image.convert("RGB")
        if image.size != (self.canvas, self.canvas):
            # Generators may render at another resolution; the analyser works at the world's canvas size.
            image = image.resize((self.canvas, self.canvas), Image.BILINEAR)
        return np.asarray(image, dtype=np.uint8)

    @torch.no_grad()
    def analyse(self, images: Sequence[Image.Image | np.ndarray], max_objects: int = 2) -> list[Analysis]:
        arrays = [self._as_array(im) for im in images]
        comps = [segment(a)[:max_objects] for a in arrays]
        inputs = [component_input(a, c) for a, cs in zip(arrays, comps, strict=True) for c in cs]
        if inputs:
            cl, sl = self.object_net(torch.from_numpy(np.stack(inputs)))
            cp, sp = cl.softmax(-1).numpy(), sl.softmax(-1).numpy()
        style = (
            self.style_net(torch.from_numpy(np.stack([style_input(a, self.canvas) for a in arrays])))
            .softmax(-1)
            .numpy()
            if arrays
            else np.zeros((0, len(STYLES)))
        )
        out, k = [], 0
        for i, cs in enumerate(comps):
            dets = []
            for c in cs:
                dets.append(Detection(c.box, c.area, cp[k], sp[k]))
                k += 1
            out.append(Analysis(tuple(dets), style[i]))
        return out

    def predict(self, images: Sequence[Image.Image | np.ndarray]) -> Prediction:
        """Colour/shape probabilities of the largest object of each image, and background style."""
        res = self.analyse(images, max_objects=1)
        b = len(res)
        colour = np.zeros((b, len(COLOURS)), np.float32)
        shape = np.zeros((b, len(SHAPES)), np.float32)
        found = np.zeros(b, bool)
        for i, r in enumerate(res):
            if r.detections:
                colour[i], shape[i], found[i] = (
                    r.detections[0].colour_probs,
                    r.detections[0].shape_probs,
                    True,
                )
        style = np.stack([r.style_probs for r in res]) if res else np.zeros((0, len(STYLES)), np.float32)
        return Prediction(colour, shape, style, found)


# --------------------------------------------------------------------------------------------- training


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild degradations a small diffusion model produces: blur, JPEG chroma smear (a model trained on
    JPEG-stored shards learns to reproduce it), noise, contrast/brightness drift."""
    img = Image.fromarray(rgb, mode="RGB")
    r = rng.random()
    if r < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.8))))
    elif r < 0.6:
        buf = io.BytesIO()
        # Mostly 4:4:4 (what mini shards should use); some 4:2:0, whose 2x2 chroma blocks smear colour
        # across the gap between two objects at 24 px.
        img.save(
            buf, format="JPEG", quality=int(rng.integers(85, 96)), subsampling=0 if rng.random() < 0.67 else 2
        )
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = np.asarray(img, np.float32)
    if rng.random() < 0.5:
        x = x * rng.uniform(0.85, 1.1) + rng.uniform(-12, 12)
    if rng.random() < 0.5:
        x = x + rng.normal(0.0, rng.uniform(1.0, 8.0), x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _match(comps: Sequence[Component], scene: Scene) -> list[tuple[Component, int]]:
    """Pair components with ground-truth objects by mask overlap with the object's box."""
    pairs = []
    for c in comps:
        best, best_i = 0.0, -1
        for i, o in enumerate(scene.objects):
            x0, y0, x1, y1 = o.box
            inside = c.mask[y0:y1, x0:x1].sum() / c.area
            if inside > best:
                best, best_i = inside, i
        if best >= 0.6:
            pairs.append((c, best_i))
    return pairs


def build_training_set(
    n_scenes: int, cfg: WorldConfig = DEFAULT_WORLD, start: int = 0, augment: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    obj_x, obj_c, obj_s, sty_x, sty_y = [], [], [], [], []
    for i in tqdm(range(start, start + n_scenes), desc="analyser data", leave=False):
        scene = scene_at("analyser", i, cfg)
        rgb = np.asarray(render(scene))
        if augment and rng.random() < 0.7:
            rgb = _augment(rgb, rng)
        for comp, k in _match(segment(rgb), scene):
            obj_x.append(component_input(rgb, comp))
            obj_c.append(COLOURS.index(scene.objects[k].colour))
            obj_s.append(SHAPES.index(scene.objects[k].shape))
        sty_x.append(style_input(rgb, cfg.canvas))
        sty_y.append(STYLES.index(scene.background.style))
    return {
        "obj_x": np.stack(obj_x),
        "obj_c": np.asarray(obj_c),
        "obj_s": np.asarray(obj_s),
        "sty_x": np.stack(sty_x),
        "sty_y": np.asarray(sty_y),
    }


def train_analyser(
    n_scenes: int = 12000,
    epochs: int = 8,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    cfg: WorldConfig = DEFAULT_WORLD,
    threads: int = 1,
) -> Analyser:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = build_training_set(n_scenes, cfg, seed=seed)
    analyser = Analyser.untrained(cfg.canvas, seed)
    gen = torch.Generator().manual_seed(seed)

    def fit(model: nn.Module, x: np.ndarray, ys: list[np.ndarray], name: str) -> None:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        xt = torch.from_numpy(x)
        yts = [torch.from_numpy(y).long() for y in ys]
        steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        bar = tqdm(total=steps, desc=f"train {name}", leave=False)
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for j in range(0, len(xt), batch_size):
                idx = perm[j : j + batch_size]
                out = model(xt[idx])
                outs = out if isinstance(out, tuple) else (out,)
                loss = sum(F.cross_entropy(o, y[idx]) for o, y in zip(outs, yts, strict=True))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        model.eval()

    fit(analyser.object_net, data["obj_x"], [data["obj_c"], data["obj_s"]], "objects")
    fit(analyser.style_net, data["sty_x"], [data["sty_y"]], "style")
    return analyser


# ------------------------------------------------------------------------------------------- accuracy


def ground_truth_accuracy(
    analyser: Analyser,
    n_scenes: int = 600,
    cfg: WorldConfig = DEFAULT_WORLD,
    split: str = "eval",
    start: int = 0,
    degrade_seed: int | None = None,
) -> dict[str, float]:
    """End-to-end accuracy on held-out renders: each ground-truth object must be found (a detection
    mostly inside its box) and classified; style per image. With `degrade_seed`, every render first gets
    the training augmentation (blur / noise / brightness), a proxy for soft generated images."""
    found = colour = shape = n_obj = style = count_ok = 0
    scenes_ = [scene_at(split, i, cfg) for i in range(start, start + n_scenes)]
    rng = np.random.default_rng(degrade_seed) if degrade_seed is not None else None
    for b in range(0, len(scenes_), 64):
        chunk = scenes_[b : b + 64]
        arrays = [np.asarray(render(s)) for s in chunk]
        if rng is not None:
            arrays = [_augment(a, rng) for a in arrays]
        results = analyser.analyse(arrays, max_objects=2)
        for scene, res in zip(chunk, results, strict=True):
            count_ok += len(res.detections) == len(scene.objects)
            style += res.style == scene.background.style
            for k, d in match_detections(res.detections, [o.box for o in scene.objects]).items():
                o = scene.objects[k]
                found += 1
                colour += d.colour == o.colour
                shape += d.shape == o.shape
            n_obj += len(scene.objects)
    return {
        "objects": n_obj,
        "images": n_scenes,
        "found": found / n_obj,
        "count": count_ok / n_scenes,
        "colour": colour / n_obj,
        "shape": shape / n_obj,
        "style": style / n_scenes,
    }


def _inside(inner: Box, outer: Box) -> float:
    """Fraction of box `inner`'s area that lies inside `outer`."""
    w = max(0, min(inner[2], outer[2]) - max(inner[0], outer[0]))
    h = max(0, min(inner[3], outer[3]) - max(inner[1], outer[1]))
    return w * h / max(1, (inner[2] - inner[0]) * (inner[3] - inner[1]))


def match_detections(detections: Sequence[Detection], boxes: Sequence[Box], min_inside: float = 0.6) -> dict:
    """{object index: detection} for ground-truth boxes (each used once), greedy by overlap."""
    cands = sorted(
        ((_inside(d.box, b), j, k) for j, d in enumerate(detections) for k, b in enumerate(boxes)),
        reverse=True,
    )
    out: dict[int, Detection] = {}
    used: set[int] = set()
    for score, j, k in cands:
        if score >= min_inside and j not in used and k not in out:
            out[k] = detections[j]
            used.add(j)
    return out


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini.analyser", description=first_line(__doc__))
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train on ground-truth renders and write weights + json")
    t.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    t.add_argument("--scenes", type=int, default=12000)
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--eval-scenes", type=int, default=1000)
    c = sub.add_parser("check", help="accuracy of saved weights on held-out ground truth")
    c.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    c.add_argument("--eval-scenes", type=int, default=1000)
    args = ap.parse_args(argv)

    if args.cmd == "train":
        t0 = time.time()
        analyser = train_analyser(
            n_scenes=args.scenes, epochs=args.epochs, seed=args.seed, threads=args.threads
        )
        acc = ground_truth_accuracy(analyser, n_scenes=args.eval_scenes)
        acc_degraded = ground_truth_accuracy(analyser, n_scenes=args.eval_scenes, degrade_seed=1)
        cmd = TRAIN_COMMAND
        defaults = {
            "out": DEFAULT_WEIGHTS,
            "scenes": 12000,
            "epochs": 8,
            "seed": 0,
            "threads": 1,
            "eval_scenes": 1000,
        }
        for k, d in defaults.items():
            if getattr(args, k) != d:
                cmd += f" --{k.replace('_', '-')} {getattr(args, k)}"
        sha = analyser.save(
            args.out, extra={"heldout_accuracy": acc, "heldout_accuracy_degraded": acc_degraded}
        )
        record = {
            "file": args.out.name,
            "sha256": sha,
            "bytes": args.out.stat().st_size,
            "command": cmd,
            "train_seconds": round(time.time() - t0, 1),
            "heldout_accuracy": acc,
            "heldout_accuracy_degraded": acc_degraded,
            "torch": torch.__version__,
        }
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
        return 0
    analyser = Analyser.load(args.weights)
    acc = {
        "clean": ground_truth_accuracy(analyser, n_scenes=args.eval_scenes),
        "degraded": ground_truth_accuracy(analyser, n_scenes=args.eval_scenes, degrade_seed=1),
    }
    print(json.dumps(acc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
