"""The MUMU-mini synthetic world: seeded scenes of 1-2 coloured shapes on styled backgrounds.

Everything here is pure numpy + PIL and deterministic: a scene is a function of
(world version, split, index) or of an explicit seed, and rendering is a pure function of the scene.

Design choices (issue 6, and the probes run on 2 CPU cores):
- 24x24 canvas, objects 8-14 px, 6 colours x 4 shapes, 3 background styles: small enough that a
  pixel-space UNet learns it on a CPU, large enough that shapes stay distinguishable.
- Object colours are fully saturated hues 60 degrees apart; backgrounds are low-saturation. That keeps the
  colour classes far apart and lets the analyser separate objects from background by saturation.
- Captions name objects only by category words ("a shape", "an object"), so colour and shape can only come
  from a reference image. The background style is named in a configurable fraction of captions only, so a
  model can also learn to take the style from a background reference.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Bump when the generator's output for a given (split, index) changes, so stale shards are detectable.
WORLD_VERSION = 1

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "magenta")
COLOUR_HUES: dict[str, float] = {name: i * 60.0 for i, name in enumerate(COLOURS)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
STYLES: tuple[str, ...] = ("flat", "gradient", "textured")
TEXTURES: tuple[str, ...] = ("checker", "hstripes", "vstripes", "diagonal")
CATEGORY_WORDS: tuple[str, ...] = ("shape", "object", "thing")
TEMPLATES: tuple[str, ...] = ("{objects} on a {background}", "{objects} in front of a {background}")
SPLITS: dict[str, int] = {"train": 0, "eval": 1, "analyser": 2}

# Supersampling factor for anti-aliased shape edges.
_SS = 4

RGB = tuple[int, int, int]
Box = tuple[int, int, int, int]


class WorldError(ValueError):
    """Bad arguments to the mini world (unknown attribute, impossible constraint)."""


@dataclass(frozen=True)
class WorldConfig:
    canvas: int = 24
    min_size: int = 8
    max_size: int = 14
    # Probability that a scene has two objects (when the caller does not fix the count).
    p_two_objects: float = 0.5
    # Pixels of background kept between two objects, so they never touch in ground truth and stay
    # separable after a model's (or JPEG's) blur.
    gap: int = 2
    # Probability that the caption names the background style ("a shape on a gradient background").
    p_style_word: float = 0.5
    # Smallest object-free square that counts as a background (style) reference box.
    min_style_box: int = 10
    # (colour, shape) pairs that never appear in the train split (held out for composition eval).
    heldout_pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 8 <= self.canvas <= 256:
            raise WorldError(f"canvas must be in [8, 256], got {self.canvas}")
        if not 4 <= self.min_size <= self.max_size <= self.canvas:
            raise WorldError(
                f"need 4 <= min_size <= max_size <= canvas, got {self.min_size}, {self.max_size}, {self.canvas}"
            )
        for name in ("p_two_objects", "p_style_word"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise WorldError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        for colour, shape in self.heldout_pairs:
            _check_colour(colour)
            _check_shape(shape)


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True)
class Background:
    style: str
    colours: tuple[RGB, RGB]
    # gradient: direction in degrees; textured: pattern period in pixels and phase.
    angle: float = 0.0
    texture: str = ""
    period: int = 2
    phase: int = 0


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    rgb: RGB
    box: Box  # pixel [x0, y0, x1, y1), square
    word: str  # the category word naming it in the caption
    span: tuple[int, int]  # character span of `word` in the caption

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    seed: int
    split: str
    canvas: int
    background: Background
    objects: tuple[WorldObject, ...]
    caption: str
    background_span: tuple[int, int]  # span of the word "background" in the caption
    style_named: bool  # whether the caption names the background style
    # Largest object-free square (at least min_style_box), the place a style reference is cropped from.
    background_box: Box | None = field(default=None)


def _check_colour(colour: str) -> None:
    if colour not in COLOURS:
        raise WorldError(f"unknown colour {colour!r}; choose one of {COLOURS}")


def _check_shape(shape: str) -> None:
    if shape not in SHAPES:
        raise WorldError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise WorldError(f"unknown background style {style!r}; choose one of {STYLES}")


def scene_seed(split: str, index: int) -> int:
    """The seed of scene `index` of `split`; splits draw from disjoint seed streams."""
    if split not in SPLITS:
        raise WorldError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
    if index < 0:
        raise WorldError(f"scene index must be >= 0, got {index}")
    ss = np.random.SeedSequence([WORLD_VERSION, SPLITS[split], index])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------- sampling


def _hsv_rgb(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb((h % 360.0) / 360.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def _object_rgb(rng: np.random.Generator, colour: str) -> RGB:
    # Small hue/brightness jitter so a model cannot rely on one exact RGB triple, while staying far
    # (>= 45 degrees) from the neighbouring hue classes.
    h = COLOUR_HUES[colour] + rng.uniform(-8.0, 8.0)
    return _hsv_rgb(h, rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))


def _background_rgb(rng: np.random.Generator, v_lo: float = 0.12, v_hi: float = 0.92) -> tuple[float, RGB]:
    v = float(rng.uniform(v_lo, v_hi))
    return v, _hsv_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.22), v)


def _sample_background(rng: np.random.Generator, style: str) -> Background:
    v1, c1 = _background_rgb(rng)
    if style == "flat":
        return Background(style, (c1, c1))
    # Two-tone styles need visible contrast, else a gradient or texture looks flat at 24 px.
    min_contrast = 0.35 if style == "gradient" else 0.25
    for _ in range(100):
        v2, c2 = _background_rgb(rng)
        if abs(v2 - v1) >= min_contrast:
            break
    else:  # pragma: no cover - probability ~0
        raise RuntimeError("could not sample a contrasting background colour")
    if style == "gradient":
        return Background(style, (c1, c2), angle=float(rng.uniform(0, 360)))
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    period = int(rng.integers(2, 4))
    return Background(style, (c1, c2), texture=texture, period=period, phase=int(rng.integers(2 * period)))


def _place_boxes(rng: np.random.Generator, cfg: WorldConfig, n: int) -> list[Box] | None:
    c = cfg.canvas
    boxes: list[Box] = []
    # Two objects get a smaller maximum so they fit side by side with the gap.
    max_size = cfg.max_size if n == 1 else max(cfg.min_size, min(cfg.max_size, (c - cfg.gap) // 2))
    for _ in range(n):
        for _attempt in range(200):
            s = int(rng.integers(cfg.min_size, max_size + 1))
            x0 = int(rng.integers(0, c - s + 1))
            y0 = int(rng.integers(0, c - s + 1))
            box = (x0, y0, x0 + s, y0 + s)
            if all(_separated(box, b, cfg.gap) for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _separated(a: Box, b: Box, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _largest_free_square(canvas: int, boxes: Sequence[Box], margin: int = 1) -> Box | None:
    """The largest square that keeps `margin` px away from every box; among equals, the first whose
    top-left corner comes first in raster order."""
    occ = np.zeros((canvas, canvas), dtype=np.int32)
    for x0, y0, x1, y1 in boxes:
        occ[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = 1
    # Summed-area table: the occupancy of every s x s window at once, largest s first.
    sat = np.zeros((canvas + 1, canvas + 1), dtype=np.int32)
    sat[1:, 1:] = occ.cumsum(0).cumsum(1)
    for s in range(canvas, 0, -1):
        window = sat[s:, s:] - sat[:-s, s:] - sat[s:, :-s] + sat[:-s, :-s]
        free = np.argwhere(window == 0)
        if len(free):
            y, x = (int(v) for v in free[0])
            return (x, y, x + s, y + s)
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def build_caption(
    words: Sequence[str], background_word: str, template: str = TEMPLATES[0]
) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    """Caption naming objects only by category words; returns (caption, word spans, background span).

    `background_word` is "background" or "<style> background"; the background span covers the word
    "background" only (a reference image is inserted right before it).
    """
    if not 1 <= len(words) <= 2:
        raise WorldError(f"a mini caption names 1 or 2 objects, got {len(words)}")
    for w in words:
        if w not in CATEGORY_WORDS:
            raise WorldError(f"objects are named only by category words {CATEGORY_WORDS}, got {w!r}")
    phrases = [f"{_article(w)} {w}" for w in words]
    objects = " and ".join(phrases)
    caption = template.format(objects=objects, background=background_word)
    spans: list[tuple[int, int]] = []
    pos = caption.index(objects)
    for w, phrase in zip(words, phrases, strict=True):
        start = caption.index(phrase, pos) + len(phrase) - len(w)
        spans.append((start, start + len(w)))
        pos = start + len(w)
    b = caption.rindex("background")
    return caption, spans, (b, b + len("background"))


def generate_scene(
    seed: int | np.random.Generator,
    cfg: WorldConfig = DEFAULT_WORLD,
    *,
    n_objects: int | None = None,
    colours: Sequence[str] | None = None,
    shapes: Sequence[str] | None = None,
    style: str | None = None,
    style_named: bool | None = None,
    require_style_box: bool = False,
    split: str = "train",
) -> Scene:
    """Sample one scene. Unfixed attributes are drawn from `seed`; fixed ones are validated.

    In the train split, `cfg.heldout_pairs` are never drawn (and asking for one is an error).
    With `require_style_box`, re-draws the layout until an object-free square of at least
    `cfg.min_style_box` exists.
    """
    if split not in SPLITS:
        raise WorldError(f"unknown split {split!r}; choose one of {tuple(SPLITS)}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    seed_int = -1 if isinstance(seed, np.random.Generator) else int(seed)
    if n_objects is None:
        n_objects = (
            len(colours) if colours else len(shapes) if shapes else 1 + int(rng.random() < cfg.p_two_objects)
        )
    if n_objects not in (1, 2):
        raise WorldError(f"n_objects must be 1 or 2, got {n_objects}")
    for name, fixed in (("colours", colours), ("shapes", shapes)):
        if fixed is not None and len(fixed) != n_objects:
            raise WorldError(f"{name} has {len(fixed)} entries but the scene has {n_objects} objects")
    if style is not None:
        _check_style(style)
    heldout = set(cfg.heldout_pairs) if split == "train" else set()

    obj_colours: list[str] = []
    obj_shapes: list[str] = []
    for i in range(n_objects):
        for _ in range(1000):
            c = colours[i] if colours else COLOURS[int(rng.integers(len(COLOURS)))]
            s = shapes[i] if shapes else SHAPES[int(rng.integers(len(SHAPES)))]
            _check_colour(c)
            _check_shape(s)
            if (c, s) not in heldout:
                break
            if colours and shapes:
                raise WorldError(f"({c}, {s}) is held out of the train split (WorldConfig.heldout_pairs)")
        else:
            raise WorldError(f"cannot draw object {i} outside heldout_pairs={sorted(heldout)}")
        obj_colours.append(c)
        obj_shapes.append(s)

    bg_style = style if style is not None else STYLES[int(rng.integers(len(STYLES)))]
    background = _sample_background(rng, bg_style)
    for _ in range(200):
        boxes = _place_boxes(rng, cfg, n_objects)
        if boxes is None:
            continue
        free = _largest_free_square(cfg.canvas, boxes)
        bg_box = free if free is not None and free[2] - free[0] >= cfg.min_style_box else None
        if bg_box is not None or not require_style_box:
            break
    else:
        raise WorldError(
            f"could not place {n_objects} objects (with a free {cfg.min_style_box}px square: "
            f"{require_style_box}) on a {cfg.canvas}px canvas; lower max_size or min_style_box"
        )
    named = bool(rng.random() < cfg.p_style_word) if style_named is None else style_named
    words = [CATEGORY_WORDS[int(rng.integers(len(CATEGORY_WORDS)))] for _ in range(n_objects)]
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    bg_word = f"{bg_style} background" if named else "background"
    caption, spans, bg_span = build_caption(words, bg_word, template)
    objects = tuple(
        WorldObject(shape=s, colour=c, rgb=_object_rgb(rng, c), box=b, word=w, span=sp)
        for s, c, b, w, sp in zip(obj_shapes, obj_colours, boxes, words, spans, strict=True)
    )
    return Scene(
        seed=seed_int,
        split=split,
        canvas=cfg.canvas,
        background=background,
        objects=objects,
        caption=caption,
        background_span=bg_span,
        style_named=named,
        background_box=bg_box,
    )


def scene_at(split: str, index: int, cfg: WorldConfig = DEFAULT_WORLD, **constraints: object) -> Scene:
    """Scene `index` of `split` (deterministic); keyword constraints as in `generate_scene`."""
    seed = scene_seed(split, index)
    return generate_scene(seed, cfg, split=split, **constraints)  # type: ignore[arg-type]


def scenes(split: str, start: int, count: int, cfg: WorldConfig = DEFAULT_WORLD) -> Iterator[Scene]:
    for i in range(start, start + count):
        yield scene_at(split, i, cfg)


# ---------------------------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=512)
def shape_coverage(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` drawn in a size x size box (float32, cached)."""
    _check_shape(shape)
    n = size * _SS
    # Sample centres in box units [0, 1].
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    y, x = np.meshgrid(t, t, indexing="ij")
    if shape == "circle":
        inside = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    elif shape == "square":
        # The full box: crisp pixel-aligned edges (an inset would blur every edge pixel at 8 px).
        inside = np.ones_like(x, dtype=bool)
    elif shape == "triangle":
        # Upright isosceles triangle: apex at the top centre, base along the bottom.
        inside = (y <= 1.0) & (np.abs(x - 0.5) <= 0.5 * y)
    else:  # cross
        arm = 1.0 / 6.0
        inside = (np.abs(x - 0.5) <= arm) | (np.abs(y - 0.5) <= arm)
    cov = inside.astype(np.float32).reshape(size, _SS, size, _SS).mean(axis=(1, 3))
    return cov


def render_background(bg: Background, canvas: int) -> np.ndarray:
    """Background pixels as float32 (canvas, canvas, 3) in [0, 255]."""
    c1 = np.asarray(bg.colours[0], dtype=np.float32)
    c2 = np.asarray(bg.colours[1], dtype=np.float32)
    if bg.style == "flat":
        return np.broadcast_to(c1, (canvas, canvas, 3)).copy()
    yy, xx = np.meshgrid(np.arange(canvas), np.arange(canvas), indexing="ij")
    if bg.style == "gradient":
        a = np.deg2rad(bg.angle)
        proj = (xx - (canvas - 1) / 2) * np.cos(a) + (yy - (canvas - 1) / 2) * np.sin(a)
        extent = (canvas - 1) / 2 * (abs(np.cos(a)) + abs(np.sin(a)))
        t = ((proj / extent + 1.0) / 2.0).astype(np.float32)[..., None]
    else:
        p, ph = bg.period, bg.phase
        if bg.texture == "checker":
            on = (((xx + ph) // p) + (yy // p)) % 2
        elif bg.texture == "hstripes":
            on = ((yy + ph) // p) % 2
        elif bg.texture == "vstripes":
            on = ((xx + ph) // p) % 2
        elif bg.texture == "diagonal":
            on = ((xx + yy + ph) // p) % 2
        else:
            raise WorldError(f"unknown texture {bg.texture!r}")
        t = on.astype(np.float32)[..., None]
    return c1 * (1.0 - t) + c2 * t


def render_array(scene: Scene) -> np.ndarray:
    """Render a scene to uint8 (H, W, 3)."""
    img = render_background(scene.background, scene.canvas)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        cov = shape_coverage(obj.shape, x1 - x0)[..., None]
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1.0 - cov) + np.asarray(obj.rgb, dtype=np.float32) * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(scene: Scene) -> Image.Image:
    return Image.fromarray(render_array(scene), mode="RGB")


def render_batch(scenes_: Sequence[Scene]) -> np.ndarray:
    """Render many scenes of one canvas size to uint8 (B, H, W, 3) (for on-the-fly training data)."""
    if not scenes_:
        raise WorldError("render_batch needs at least one scene")
    sizes = {s.canvas for s in scenes_}
    if len(sizes) != 1:
        raise WorldError(f"render_batch needs scenes of one canvas size, got {sorted(sizes)}")
    out = np.empty((len(scenes_), scenes_[0].canvas, scenes_[0].canvas, 3), dtype=np.uint8)
    for i, s in enumerate(scenes_):
        out[i] = render_array(s)
    return out


def render_background_only(scene: Scene) -> Image.Image:
    return Image.fromarray(
        np.clip(np.rint(render_background(scene.background, scene.canvas)), 0, 255).astype(np.uint8),
        mode="RGB",
    )


# ------------------------------------------------------------------------------------------ references


def _crop(img: Image.Image, box: Box, margin: int) -> Image.Image:
    x0, y0, x1, y1 = box
    w, h = img.size
    return img.crop((max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)))


def object_crop(scene: Scene, index: int, margin: int = 0, image: Image.Image | None = None) -> Image.Image:
    """The reference image of object `index`: its box (plus `margin` px, clipped) cut from the render."""
    if not 0 <= index < len(scene.objects):
        raise WorldError(f"scene has {len(scene.objects)} objects, no object {index}")
    return _crop(image if image is not None else render(scene), scene.objects[index].box, margin)


def style_reference(scene: Scene) -> Image.Image:
    """A background-only patch (the scene's largest object-free square) that shows the style."""
    if scene.background_box is None:
        raise WorldError(
            "this scene has no object-free square large enough for a style reference; "
            "generate it with require_style_box=True"
        )
    return _crop(render_background_only(scene), scene.background_box, 0)


def interleave(
    caption: str, inserts: Sequence[tuple[int, str]], placeholder: str = "<image>", sep: str = " "
) -> str:
    """Insert `placeholder` + `sep` right before each given character position of `caption` (paper style:
    "a <image> shape"). `inserts` is a sequence of (position, tag); tag replaces the placeholder if set.
    `sep=""` gives "a <image>shape", the form training's data rules build (the crop goes right before
    its word), which the mini evaluation and demo use so their prompts tokenize like training's."""
    out, last = [], 0
    for pos, tag in sorted(inserts, key=lambda t: t[0]):
        if not 0 <= pos <= len(caption):
            raise WorldError(f"insert position {pos} outside caption of length {len(caption)}")
        out.append(caption[last:pos])
        out.append(f"{tag or placeholder}{sep}")
        last = pos
    out.append(caption[last:])
    return "".join(out)


# ------------------------------------------------------------------------------ known-boxes records


def known_boxes_record(scene: Scene, key: str | None = None, include_background: bool = True) -> dict:
    """A known-boxes record for the data pipeline: {key, image, caption, width, height, objects}.

    objects: [{phrase, span, box, label}], box pixel [x0, y0, x1, y1]. With `include_background`, the
    largest object-free square (if any) is listed too with phrase "background", so bootstrapping also
    yields style references (label "background:<style>").
    """
    objects = [
        {"phrase": o.word, "span": list(o.span), "box": list(o.box), "label": o.label} for o in scene.objects
    ]
    if include_background and scene.background_box is not None:
        objects.append(
            {
                "phrase": "background",
                "span": list(scene.background_span),
                "box": list(scene.background_box),
                "label": f"background:{scene.background.style}",
            }
        )
    return {
        "key": key or f"mini-{scene.split}-{scene.seed:020d}",
        "image": render(scene),
        "caption": scene.caption,
        "width": scene.canvas,
        "height": scene.canvas,
        "objects": objects,
    }


def known_boxes_records(
    split: str,
    count: int,
    start: int = 0,
    cfg: WorldConfig = DEFAULT_WORLD,
    include_background: bool = True,
) -> Iterator[dict]:
    """Records of scenes [start, start + count) of `split`, keys "mini-<split>-<index>"."""
    for i in range(start, start + count):
        yield known_boxes_record(scene_at(split, i, cfg), f"mini-{split}-{i:08d}", include_background)


# ------------------------------------------------------------------------------ bootstrapping bridge


def bootstrap_source(
    split: str = "train",
    count: int = 1000,
    start: int = 0,
    cfg: WorldConfig = DEFAULT_WORLD,
    images_per_part: int = 1000,
    include_background: bool = True,
):
    """A `mumu_core.data.sources.KnownBoxesSource` over scenes [start, start + count) of `split`."""
    from ..data.sources import KnownBoxesSource

    records = known_boxes_records(split, count, start, cfg, include_background)
    return KnownBoxesSource(list(records), images_per_part=images_per_part, name=f"mini-{split}")


def bootstrap_config(cfg: WorldConfig = DEFAULT_WORLD, **overrides: object):
    """The paper's crop rules at the mini world's scale: the smallest object is the smallest crop.

    No control images and no head detection (there are no people and no detector in the mini world).
    """
    from ..data.config import BootstrapConfig

    kwargs: dict[str, object] = {"min_crop_side": cfg.min_size, "controls": (), "head_detection": False}
    kwargs.update(overrides)
    return BootstrapConfig(**kwargs)  # type: ignore[arg-type]
