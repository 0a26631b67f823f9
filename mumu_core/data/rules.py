"""The paper's crop rules and the interleaved prompt of a record. Pure functions, no models, no IO.

Rule order (each object gets the first reason that applies, ``reason`` is null when kept):

1. ``below_threshold``: no box, or its score is below ``box_threshold``.
2. ``too_small``: the integer crop box is narrower OR shorter than ``min_crop_side``
   (150 px: a 150x150 crop is kept, 149x150 is dropped).
3. ``too_large``: the crop covers MORE than ``max_crop_area_frac`` of the image area
   (exactly 75 % is kept).
4. ``duplicate``: its box overlaps (IoU > ``duplicate_iou``) a better-ranked surviving object, e.g.
   "man" and "person" landing on the same detection; otherwise the prompt would show one crop twice.
5. ``over_limit``: beyond the first ``max_crops`` survivors in rank order.

Rank order: higher score first, then the earlier span (so ties keep the object mentioned first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .config import BootstrapConfig

REASONS = ("below_threshold", "too_small", "too_large", "duplicate", "over_limit")

Box = tuple[int, int, int, int]


@dataclass
class Candidate:
    """One grounded phrase before the rules: a detector result or a known box."""

    phrase: str
    span: tuple[int, int]
    box: Sequence[float] | None  # pixel [x0, y0, x1, y1] in the source image; None = nothing found
    score: float
    label: str
    is_person: bool
    head_box: Sequence[float] | None = None


def clip_box(box: Sequence[float], width: int, height: int) -> Box:
    """Round a float pixel box to the integer crop that is actually cut, clipped to the image.

    Rounding to nearest (not floor/ceil) keeps a detector box's size unbiased; the rules then judge
    exactly the pixels that end up in the crop file.
    """
    if len(box) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError(f"box has non-finite coordinates: {list(box)}")
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must have x1 >= x0 and y1 >= y0, got {list(box)}")
    cx0 = min(max(round(x0), 0), width)
    cy0 = min(max(round(y0), 0), height)
    cx1 = min(max(round(x1), 0), width)
    cy1 = min(max(round(y1), 0), height)
    return (cx0, cy0, cx1, cy1)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def apply_rules(cands: Sequence[Candidate], width: int, height: int, cfg: BootstrapConfig) -> list[dict]:
    """Judge every candidate; return record objects in caption (span) order.

    Each object dict has the record fields of docs/ARCHITECTURE.md ("Shard record") except the crop
    file names, which the writer fills in (``crop`` / ``head_crop`` are None here).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    order = sorted(range(len(cands)), key=lambda i: (cands[i].span[0], cands[i].span[1], i))
    objs: list[dict] = []
    for i in order:
        c = cands[i]
        box = clip_box(c.box, width, height) if c.box is not None else None
        head = clip_box(c.head_box, width, height) if c.head_box is not None else None
        objs.append(
            {
                "phrase": c.phrase,
                "span": [int(c.span[0]), int(c.span[1])],
                "box": list(box) if box is not None else None,
                "score": round(float(c.score), 4),
                "label": c.label,
                "is_person": bool(c.is_person),
                "crop": None,
                "head_crop": None,
                "head_box": list(head) if head is not None else None,
                "kept": False,
                "reason": None,
            }
        )
    image_area = width * height
    survivors = []
    for idx, o in enumerate(objs):
        b = o["box"]
        if b is None or o["score"] < cfg.box_threshold:
            o["reason"] = "below_threshold"
        elif min(b[2] - b[0], b[3] - b[1]) < cfg.min_crop_side:
            o["reason"] = "too_small"
        elif (b[2] - b[0]) * (b[3] - b[1]) > cfg.max_crop_area_frac * image_area:
            o["reason"] = "too_large"
        else:
            survivors.append(idx)
    survivors.sort(key=lambda k: (-objs[k]["score"], objs[k]["span"][0], k))
    ranked: list[int] = []
    for k in survivors:
        if any(box_iou(objs[k]["box"], objs[j]["box"]) > cfg.duplicate_iou for j in ranked):
            objs[k]["reason"] = "duplicate"
        else:
            ranked.append(k)
    for rank, k in enumerate(ranked):
        if rank < cfg.max_crops:
            objs[k]["kept"] = True
        else:
            objs[k]["reason"] = "over_limit"
    return objs


def build_prompt(caption: str, objects: Sequence[dict]) -> list[dict]:
    """Interleave the caption with the kept crops: each crop goes right before its words.

    ``[{"text": "a "}, {"image": "crop0.png", "object": 0}, {"text": "man and his dog"}]``.
    Empty text segments are left out.
    """
    kept = sorted(
        (i for i, o in enumerate(objects) if o["kept"]),
        key=lambda i: (objects[i]["span"][0], i),
    )
    segs: list[dict] = []
    pos = 0
    for i in kept:
        o = objects[i]
        if o["crop"] is None:
            raise ValueError(f"kept object {i} ({o['phrase']!r}) has no crop file name")
        start = o["span"][0]
        if start > pos:
            segs.append({"text": caption[pos:start]})
            pos = start
        segs.append({"image": o["crop"], "object": i})
    if pos < len(caption):
        segs.append({"text": caption[pos:]})
    return segs


def summarize(objects: Sequence[dict]) -> dict[str, int]:
    """Per-record filter statistics: ``kept`` plus one count per reason."""
    out = {"kept": 0, **{r: 0 for r in REASONS}}
    for o in objects:
        out["kept" if o["kept"] else o["reason"]] += 1
    return out
