"""Inputs of the bootstrap. A source is split into *parts*; one part becomes one output shard.

Parts are what makes resuming cheap (a finished part is known from its output files, without
reading any input) and what Ray distributes. Every source is a small picklable object (paths and
settings), so Ray ships it to workers; items are read inside the worker.

- ``WebDatasetSource``: img2dataset tar shards (``key.jpg`` + ``key.txt`` and/or ``key.json``);
  one input tar = one part.
- ``ParquetSource``: parquet files with image bytes (or an HF ``{"bytes", "path"}`` struct, or a
  path) plus a caption column; one row group = one part.
- ``FolderSource``: a folder (recursive) of images with a same-stem ``.txt`` caption each;
  ``images_per_part`` images per part, in sorted path order.
- ``KnownBoxesSource``: records that already have boxes (synthetic scenes, COCO); skips the detector.

A read problem never raises out of ``read_part``: it yields a ``SourceItem`` with ``error`` set, so
the pipeline logs it, counts it and goes on. That includes a caption that is not valid UTF-8 text
(``caption_problem``): it is never "repaired" with replacement characters, the item is skipped.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .phrases import is_person_phrase

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class SourceItem:
    """One text-image pair as read from the input (image still encoded)."""

    source_key: str
    image_bytes: bytes | None = None
    caption: str | None = None
    objects: list[dict] | None = None  # known boxes: skip the detector
    phrases: list[dict] | None = None  # caller-supplied phrases [{"phrase", "span"}]
    error: str | None = None
    meta: dict | None = None  # webdataset: the sample's json (img2dataset: url, key, ...), for tracing


class Source(ABC):
    """A set of text-image pairs split into parts (the unit of work and of resuming)."""

    name = "source"
    needs_detector = True

    @abstractmethod
    def num_parts(self) -> int: ...

    @abstractmethod
    def read_part(self, index: int) -> Iterator[SourceItem]: ...

    def describe(self) -> dict:
        return {"type": self.name}


def _expand(paths: str | os.PathLike | Sequence[str | os.PathLike], suffixes: tuple[str, ...]) -> list[Path]:
    """Files from a file, a folder (recursive) or a list of either; sorted for deterministic parts."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[Path] = []
    for p in items:
        p = Path(p)
        if p.is_dir():
            out.extend(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(suffixes))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    if not out:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files found in {items}")
    return sorted(set(out))


def _json_meta(data: bytes | None) -> dict | None:
    try:
        meta = json.loads(data) if data else None
    except ValueError:
        return None
    return meta if isinstance(meta, dict) else None


def caption_problem(caption: object) -> str | None:
    """Why ``caption`` cannot be stored as a record's caption, or None when it can."""
    if not isinstance(caption, str):
        return f"caption is {type(caption).__name__}, not text"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from a JSON "\ud800" escape
        return f"caption is not valid Unicode text ({e.reason} at {e.start})"
    if "\x00" in caption:
        return "caption contains a NUL character"
    return None


def decode_caption(data: bytes, what: str) -> tuple[str | None, str | None]:
    """(caption, None) for UTF-8 text, else (None, the reason)."""
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return None, f"{what} is not UTF-8 text (byte {e.start}: {e.reason})"
    problem = caption_problem(text)
    return (None, f"{what}: {problem}") if problem else (text, None)


def _json_caption(data: bytes) -> str | None:
    try:
        meta = json.loads(data)
    except ValueError:
        return None
    for k in ("caption", "text", "TEXT", "prompt"):
        if isinstance(meta, dict) and isinstance(meta.get(k), str):
            return meta[k]
    return None


class WebDatasetSource(Source):
    """img2dataset-layout tar shards; a shard that breaks mid-way keeps the samples before the break."""

    name = "webdataset"

    def __init__(
        self, paths: str | os.PathLike | Sequence[str | os.PathLike], captions_required: bool = True
    ):
        self.paths = [str(p) for p in _expand(paths, (".tar",))]
        self.captions_required = captions_required  # curate captions images itself

    def num_parts(self) -> int:
        return len(self.paths)

    def describe(self) -> dict:
        return {"type": self.name, "files": self.paths}

    def read_part(self, index: int) -> Iterator[SourceItem]:
        path = self.paths[index]
        group: dict[str, bytes] = {}
        current: str | None = None

        def emit(key: str, members: dict[str, bytes]) -> SourceItem:
            img = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
            cap = None
            if "txt" in members:
                cap, problem = decode_caption(members["txt"], f"{key}.txt")
                if problem:
                    return SourceItem(key, error=problem)
            if cap is None and "json" in members:
                cap = _json_caption(members["json"])
                if cap is not None and caption_problem(cap):
                    return SourceItem(key, error=f"{key}.json caption: {caption_problem(cap)}")
            if img is None:
                return SourceItem(key, error="no image member (jpg/jpeg/png/webp)")
            if cap is None and self.captions_required:
                return SourceItem(key, error="no caption (key.txt or a 'caption' field in key.json)")
            return SourceItem(key, image_bytes=img, caption=cap, meta=_json_meta(members.get("json")))

        try:
            with tarfile.open(path, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    d, base = os.path.split(m.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = f"{d}/{stem}" if d else stem
                    if key != current:
                        if current is not None:
                            yield emit(current, group)
                        current, group = key, {}
                    f = tf.extractfile(m)
                    group[ext.lower()] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError) as e:
            # A truncated/corrupt tar: the group being read may be incomplete, so it is not emitted.
            yield SourceItem(f"{Path(path).name}#corrupt", error=f"corrupt tar {path}: {e}")
            return
        if current is not None:
            yield emit(current, group)


class FolderSource(Source):
    """Images with same-stem ``.txt`` captions, found recursively, in sorted order."""

    name = "folder"

    def __init__(self, root: str | os.PathLike, images_per_part: int = 1000, captions_required: bool = True):
        self.root = str(root)
        self.images = [str(p) for p in _expand(root, IMAGE_EXTS)]
        self.images_per_part = int(images_per_part)
        self.captions_required = captions_required  # curate captions images itself

    def num_parts(self) -> int:
        return (len(self.images) + self.images_per_part - 1) // self.images_per_part

    def describe(self) -> dict:
        return {"type": self.name, "root": self.root, "images": len(self.images)}

    def read_part(self, index: int) -> Iterator[SourceItem]:
        chunk = self.images[index * self.images_per_part : (index + 1) * self.images_per_part]
        for p in chunk:
            key = os.path.relpath(p, self.root)
            txt = Path(p).with_suffix(".txt")
            try:
                if not txt.is_file() and self.captions_required:
                    yield SourceItem(key, error=f"no caption file {txt}")
                    continue
                cap = None
                if txt.is_file():
                    cap, problem = decode_caption(txt.read_bytes(), f"caption file {txt}")
                    if problem:
                        yield SourceItem(key, error=problem)
                        continue
                yield SourceItem(key, image_bytes=Path(p).read_bytes(), caption=cap)
            except OSError as e:
                yield SourceItem(key, error=f"cannot read {p}: {e}")


class ParquetSource(Source):
    """Parquet rows with an image column (bytes / {"bytes","path"} struct / path) and a caption column."""

    name = "parquet"
    CAPTION_COLUMNS = ("caption", "text", "TEXT", "prompt")
    IMAGE_COLUMNS = ("image", "jpg", "png", "image_bytes", "bytes", "image_path", "path", "file_name")

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        image_column: str | None = None,
        caption_column: str | None = None,
        image_root: str | os.PathLike | None = None,
        captions_required: bool = True,
    ):
        import pyarrow.parquet as pq

        self.files = [str(p) for p in _expand(paths, (".parquet",))]
        self.image_root = str(image_root) if image_root is not None else None
        self.captions_required = captions_required  # curate captions images itself
        self.parts: list[tuple[str, int]] = []
        cols = None
        for f in self.files:
            meta = pq.ParquetFile(f)
            names = meta.schema_arrow.names
            cols = names if cols is None else cols
            self.parts.extend((f, g) for g in range(meta.num_row_groups))
        names = cols or []
        self.image_column = image_column or next((c for c in self.IMAGE_COLUMNS if c in names), None)
        self.caption_column = caption_column or next((c for c in self.CAPTION_COLUMNS if c in names), None)
        for what, col, options in (
            ("image", self.image_column, self.IMAGE_COLUMNS),
            ("caption", self.caption_column, self.CAPTION_COLUMNS),
        ):
            if what == "caption" and not captions_required and caption_column is None and col not in names:
                self.caption_column = None  # curate captions images itself: no caption column is fine
                continue
            if col is None or col not in names:
                raise ValueError(
                    f"parquet {self.files[0]} has no {what} column (columns: {names}); name it with "
                    f"--{what}-column or use one of {list(options)}"
                )
        self.key_column = "key" if "key" in names else None

    def num_parts(self) -> int:
        return len(self.parts)

    def describe(self) -> dict:
        return {
            "type": self.name,
            "files": self.files,
            "image_column": self.image_column,
            "caption_column": self.caption_column,
        }

    def _image_bytes(self, value: Any, parquet_file: str) -> bytes:
        if isinstance(value, dict):  # Hugging Face datasets Image feature
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        if isinstance(value, str):
            p = Path(value)
            if not p.is_absolute():
                p = Path(self.image_root or Path(parquet_file).parent) / p
            return p.read_bytes()
        raise ValueError(f"unsupported image value of type {type(value).__name__}")

    def read_part(self, index: int) -> Iterator[SourceItem]:
        import pyarrow.parquet as pq

        f, group = self.parts[index]
        cols = [self.image_column] + [c for c in (self.caption_column, self.key_column) if c]
        try:
            table = pq.ParquetFile(f).read_row_group(group, columns=cols)
        except Exception as e:  # pyarrow raises several types for a damaged file
            yield SourceItem(
                f"{Path(f).name}:rg{group}#corrupt", error=f"cannot read {f} row group {group}: {e}"
            )
            return
        rows = table.to_pylist()
        for r, row in enumerate(rows):
            key = str(row[self.key_column]) if self.key_column else f"{Path(f).stem}:{group}:{r}"
            cap = row[self.caption_column] if self.caption_column else None
            if (self.captions_required or cap is not None) and caption_problem(cap):
                yield SourceItem(key, error=caption_problem(cap))
                continue
            try:
                yield SourceItem(key, image_bytes=self._image_bytes(row[self.image_column], f), caption=cap)
            except (OSError, ValueError) as e:
                yield SourceItem(key, error=f"cannot read image: {e}")


def _encode_image(image: Any) -> bytes | str:
    """Encoded bytes, or a path string read later in the worker (a COCO set is not held in memory)."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")  # lossless: synthetic scenes stay pixel-exact
        return buf.getvalue()
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return str(image)
    raise TypeError(f"record image must be a PIL image, bytes or a path, got {type(image).__name__}")


def _check_object(o: dict, caption: str, where: str) -> dict:
    for k in ("phrase", "span", "box"):
        if k not in o:
            raise ValueError(f"{where}: object needs {k!r} (has {sorted(o)})")
    s, e = (int(v) for v in o["span"])
    if not 0 <= s < e <= len(caption) or caption[s:e] != o["phrase"]:
        raise ValueError(
            f"{where}: span {[s, e]} gives {caption[s:e]!r} in caption {caption!r}, not phrase {o['phrase']!r}"
        )
    if len(o["box"]) != 4:
        raise ValueError(f"{where}: box must be [x0, y0, x1, y1], got {o['box']}")
    return {
        "phrase": o["phrase"],
        "span": [s, e],
        "box": [float(v) for v in o["box"]],
        "score": float(o.get("score", 1.0)),
        "label": str(o.get("label", o["phrase"])),
        "is_person": bool(o.get("is_person", is_person_phrase(o["phrase"]))),
        "head_box": [float(v) for v in o["head_box"]] if o.get("head_box") is not None else None,
    }


class KnownBoxesSource(Source):
    """Records that already have boxes; the detector is skipped, the rules and output are the same.

    A record: ``{"image": PIL | bytes | path, "caption": str, "key": optional str,
    "objects": [{"phrase", "span": [s, e], "box": [x0, y0, x1, y1], "label"?, "is_person"?,
    "head_box"?, "score"? (default 1.0)}]}``. Spans must index the caption exactly.
    ``is_person`` defaults to the phrase heuristic. Person objects get a head crop only from
    ``head_box`` (no detector runs for this source).
    Records are validated and their images encoded when the source is built, so a bad record
    fails here, naming the record, and not in a worker.
    """

    name = "known_boxes"
    needs_detector = False

    def __init__(self, records: Sequence[dict], images_per_part: int = 1000, name: str = "known"):
        self.label = name
        self.images_per_part = int(images_per_part)
        self.items: list[tuple[str, bytes | str, str, list[dict]]] = []
        for i, r in enumerate(records):
            where = f"record {i}"
            if not isinstance(r.get("caption"), str):
                raise ValueError(f"{where}: 'caption' must be a string")
            if "image" not in r:
                raise ValueError(f"{where}: needs 'image' (PIL image, encoded bytes or a path)")
            objs = [
                _check_object(o, r["caption"], f"{where} object {j}")
                for j, o in enumerate(r.get("objects", []))
            ]
            key = str(r.get("key", f"{name}-{i:06d}"))
            self.items.append((key, _encode_image(r["image"]), r["caption"], objs))

    def num_parts(self) -> int:
        return (len(self.items) + self.images_per_part - 1) // self.images_per_part

    def describe(self) -> dict:
        return {"type": self.name, "name": self.label, "records": len(self.items)}

    def read_part(self, index: int) -> Iterator[SourceItem]:
        for key, image, caption, objs in self.items[
            index * self.images_per_part : (index + 1) * self.images_per_part
        ]:
            if isinstance(image, str):
                try:
                    image = Path(image).read_bytes()
                except OSError as e:
                    yield SourceItem(key, error=f"cannot read {image}: {e}")
                    continue
            yield SourceItem(key, image_bytes=image, caption=caption, objects=[dict(o) for o in objs])

    @classmethod
    def from_coco(
        cls,
        annotations: str | os.PathLike,
        image_root: str | os.PathLike,
        images_per_part: int = 1000,
        max_objects: int = 8,
    ) -> KnownBoxesSource:
        """COCO instances JSON (+ optional keypoints) -> known-boxes records.

        COCO has no caption that names its boxes, so one is written from the categories, largest
        objects first: "a dog, a person and a frisbee"; each phrase is the category name with its
        span. ``iscrowd`` annotations are skipped. A person's head box comes from an annotation
        ``head_box`` field ([x, y, w, h], our extension) or else from the face keypoints (nose, eyes,
        ears) of person_keypoints files: their bounding box, made square and enlarged 1.8x.
        """
        data = json.loads(Path(annotations).read_text("utf-8"))
        cats = {c["id"]: c for c in data.get("categories", [])}
        by_image: dict[int, list[dict]] = {}
        for a in data.get("annotations", []):
            if not a.get("iscrowd", 0):
                by_image.setdefault(a["image_id"], []).append(a)
        records = []
        for im in sorted(data.get("images", []), key=lambda x: x["id"]):
            anns = sorted(by_image.get(im["id"], []), key=lambda a: -a["bbox"][2] * a["bbox"][3])[
                :max_objects
            ]
            if not anns:
                continue
            names = [cats[a["category_id"]]["name"] for a in anns]
            caption, objects = "", []
            for j, (a, n) in enumerate(zip(anns, names, strict=True)):
                sep = "" if j == 0 else (" and " if j == len(anns) - 1 else ", ")
                art = "an " if n[0].lower() in "aeiou" else "a "
                caption += sep + art + n
                start = len(caption) - len(n)
                x, y, w, h = a["bbox"]
                cat = cats[a["category_id"]]
                person = cat["name"] == "person" or cat.get("supercategory") == "person"
                objects.append(
                    {
                        "phrase": n,
                        "span": [start, start + len(n)],
                        "box": [x, y, x + w, y + h],
                        "label": n,
                        "is_person": person,
                        "head_box": _coco_head_box(a) if person else None,
                    }
                )
            records.append(
                {
                    "key": f"coco-{im['id']}",
                    "image": str(Path(image_root) / im["file_name"]),
                    "caption": caption,
                    "objects": objects,
                }
            )
        return cls(records, images_per_part=images_per_part, name="coco")


def _coco_head_box(ann: dict) -> list[float] | None:
    if ann.get("head_box") is not None:
        x, y, w, h = ann["head_box"]
        return [x, y, x + w, y + h]
    kp = ann.get("keypoints")
    if not kp or len(kp) < 15:
        return None
    pts = [(kp[3 * i], kp[3 * i + 1]) for i in range(5) if kp[3 * i + 2] > 0]  # nose, eyes, ears
    if len(pts) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    side = max(max(xs) - min(xs), max(ys) - min(ys)) * 1.8
    return [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
