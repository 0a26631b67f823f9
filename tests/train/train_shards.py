"""Small webdataset shards written exactly as docs/ARCHITECTURE.md "Shard record" describes."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image

PHRASES = [("man", True), ("dog", False), ("woman", True), ("cat", False), ("tree", False), ("car", False)]


def png(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def jpg(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, format="JPEG", quality=95)
    return b.getvalue()


def make_record(i: int, rng: random.Random, n_objects: int, controls: tuple[str, ...], size=(48, 40)):
    """One sample: (members dict for TarWriter). Objects are coloured boxes on a grey image."""
    w, h = size
    chosen = rng.sample(PHRASES, n_objects)
    words = []
    for phrase, _ in chosen:
        words.append(f"a {phrase}")
    caption = " and ".join(words) + " outside"
    img = Image.new("RGB", (w, h), (100, 100, 100))
    members: dict[str, bytes] = {}
    objects = []
    pos = 0
    for k, (phrase, person) in enumerate(chosen):
        start = caption.index(phrase, pos)
        pos = start + len(phrase)
        x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
        box = [x0, y0, x0 + w // 3, y0 + h // 3]
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        img.paste(colour, box)
        crop = Image.new("RGB", (box[2] - box[0], box[3] - box[1]), colour)
        members[f"crop{k}.png"] = png(crop)
        obj = {
            "phrase": phrase,
            "span": [start, start + len(phrase)],
            "box": box,
            "score": 0.8,
            "label": phrase,
            "is_person": person,
            "crop": f"crop{k}.png",
            "head_crop": None,
            "head_box": None,
            "kept": True,
            "reason": None,
        }
        if person:
            members[f"head{k}.png"] = png(crop.crop((0, 0, crop.width, crop.height // 2)))
            obj["head_crop"] = f"head{k}.png"
            obj["head_box"] = [box[0], box[1], box[2], box[1] + (box[3] - box[1]) // 2]
        objects.append(obj)
    # One dropped object: training must ignore it.
    objects.append(
        {
            "phrase": "outside",
            "span": [len(caption) - 7, len(caption)],
            "box": [0, 0, w, h],
            "score": 0.5,
            "label": "outside",
            "is_person": False,
            "crop": None,
            "head_crop": None,
            "head_box": None,
            "kept": False,
            "reason": "too_large",
        }
    )
    ctrl = {}
    for c in controls:
        members[f"{c}.png"] = png(img.convert("L").convert("RGB"))
        ctrl[c] = f"{c}.png"
    key = f"s000000-{i:06d}"
    prompt = []
    p = 0
    for k, o in enumerate(objects[:-1]):
        if o["span"][0] > p:
            prompt.append({"text": caption[p : o["span"][0]]})
            p = o["span"][0]
        prompt.append({"image": o["crop"], "object": k})
    prompt.append({"text": caption[p:]})
    record = {
        "key": key,
        "caption": caption,
        "width": w,
        "height": h,
        "objects": objects,
        "controls": ctrl,
        "prompt": prompt,
    }
    members["jpg"] = jpg(img)
    members["json"] = json.dumps(record).encode()
    members["__key__"] = key
    return members


def write_shards(
    folder: Path,
    n_shards: int = 2,
    per_shard: int = 4,
    seed: int = 0,
    controls: tuple[str, ...] = ("canny", "sketch"),
    size=(48, 40),
) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    i = 0
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for _ in range(per_shard):
                sink.write(make_record(i, rng, rng.randint(1, 4), controls, size))
                i += 1
        paths.append(str(path))
    return paths
