"""``curate``: real photos -> filtered, person-centred, LLaVA-captioned webdataset shards (docs/DATA.md).

The paper's extra data: "high quality, realistic, publicly available images largely containing people",
SFW, high resolution, non-watermarked, with 0 or 1 people, centre-cropped to the person and captioned
with LLaVA 1.6. The output is read by ``python -m mumu_core.data bootstrap`` as a webdataset input.

Three stages over rows (one row per input item, in part order; the same functions on both executors):

1. ``read_rows`` (CPU): one part of the source -> rows, then an end-of-part marker row;
2. ``cheap_stage`` (CPU): header checks, the resolution filter, full decode (truncated files fail here);
3. ``ModelStage`` (GPU actors on Ray): SFW, watermark, people count, crop, caption, optional PickScore.

``PartAssembler`` (the driver) streams each part's kept rows into ``shard-{part:06d}.tar`` in position
order, then writes ``shard-{part:06d}.json`` (statistics: the "finished" marker) - the bootstrap's
atomic/resume convention (``mumu_core.data.shards``). ``curate(...)`` skips finished parts and writes
``manifest.json`` and ``contact_sheet.png``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image, ImageDraw

from .contact_sheet import _font, _thumb
from .filters import (
    CLASSIFIER_HINT,
    DETECTOR_HINT,
    LLAVA_HINT,
    BadImage,
    ImageClassifier,
    LlavaCaptioner,
    PeopleDetector,
    check_model_folder,
    decode_photo,
    jpeg_bytes,
    person_crop_box,
    read_header,
    resolution_reason,
    resolution_scores,
)

# The bootstrap's part files and "finished" rule (shard + statistics with the same config fingerprint).
from .pipeline import finished_part_stats, is_finished, part_paths, remove_stale_temp_files
from .shards import Sample, ShardWriter, iter_samples, write_bytes_atomic, write_json_atomic
from .sources import Source, SourceItem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHEET = "contact_sheet.png"
# Every reason an item is not kept, cheapest check first (the order the manifest lists them in).
REASONS = (
    "read_error",
    "empty_file",
    "not_an_image",
    "unsupported_format",
    "too_many_pixels",
    "short_side",
    "megapixels",
    "aspect",
    "truncated",
    "nsfw",
    "watermark",
    "people",
    "no_caption",
    "empty_caption",
    "pickscore",
    "failed",
)
DEFAULT_PROMPT = (
    "Describe this photo in one sentence: who or what is in it, what they wear and do, and where."
)


@dataclass
class CurateConfig:
    """Every knob of ``curate``. A filter is switched off with its boolean; an enabled model filter
    without a model folder is an error, never a silent skip."""

    # --- resolution (from the header, before decoding) ---
    resolution_filter: bool = True
    min_short_side: int = 512
    min_megapixels: float = 0.25
    max_aspect: float = 2.0  # long side / short side
    max_pixels: int = 100_000_000  # decode guard: larger images are not decoded ("too_many_pixels")
    # --- SFW classifier ---
    sfw_filter: bool = True
    sfw_model: str | None = None
    sfw_labels: tuple[str, ...] = ("nsfw",)
    max_nsfw: float = 0.5  # dropped when P(nsfw labels) > this
    # --- watermark classifier ---
    watermark_filter: bool = True
    watermark_model: str | None = None
    watermark_labels: tuple[str, ...] = ("watermark",)
    max_watermark: float = 0.5
    # --- people ---
    people_filter: bool = True
    people_model: str | None = None
    people_labels: tuple[str, ...] = ("person",)
    people_threshold: float = 0.5  # detection score of a counted person
    people_min_area: float = 0.0  # persons covering less than this fraction of the image are not counted
    max_people: int = 1  # the paper: 0 or 1 people
    # --- optional PickScore minimum (mumu_core.data.pickscore.PickScorer); None = off ---
    pickscore_model: str | None = None
    pickscore_processor: str | None = None
    min_pickscore: float = 19.0
    # --- crop ---
    crop: bool = True
    aspect_buckets: tuple[float, ...] = (1.0,)  # width / height of the allowed crops
    max_side: int = 0  # downscale the stored crop to this longest side (0 = keep)
    # --- captions ---
    caption: bool = True  # False: keep the source caption (items without one are dropped, "no_caption")
    caption_model: str | None = None
    caption_prompt: str = DEFAULT_PROMPT
    caption_max_tokens: int = 77
    # --- runtime (not in the fingerprint) ---
    batch_size: int = 8
    images_per_part: int = 1000  # folder / parquet sources: images per output shard
    device: str = "auto"
    dtype: str = "float32"
    model_side: int = 1024  # images are shown to the models at most this large (boxes map back)
    jpeg_quality: int = 95
    examples_per_reason: int = 2  # dropped thumbnails kept per reason per part (contact sheet)

    RUNTIME = ("batch_size", "device", "dtype", "model_side", "examples_per_reason")

    def validate(self) -> CurateConfig:
        """Raise ValueError / FileNotFoundError naming the bad field; checks model folders (cheap)."""
        for k in ("sfw_labels", "watermark_labels", "people_labels", "aspect_buckets"):
            setattr(self, k, tuple(getattr(self, k)))
        for k in ("max_nsfw", "max_watermark", "people_threshold", "people_min_area"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ValueError(f"{k} must be in [0, 1], got {getattr(self, k)}")
        if self.min_short_side < 0 or self.min_megapixels < 0 or self.max_aspect < 1:
            raise ValueError("min_short_side and min_megapixels must be >= 0 and max_aspect >= 1")
        if self.max_people < 0 or not self.aspect_buckets or min(self.aspect_buckets) <= 0:
            raise ValueError("max_people must be >= 0 and aspect_buckets positive numbers (width / height)")
        if min(self.batch_size, self.images_per_part, self.caption_max_tokens, self.model_side) < 1:
            raise ValueError("batch_size, images_per_part, caption_max_tokens and model_side must be >= 1")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        need = [
            (self.sfw_filter, self.sfw_model, "SFW classifier", "--sfw-model", "--no-sfw", CLASSIFIER_HINT),
            (
                self.watermark_filter,
                self.watermark_model,
                "watermark classifier",
                "--watermark-model",
                "--no-watermark",
                CLASSIFIER_HINT,
            ),
            (
                self.people_filter,
                self.people_model,
                "people detector",
                "--people-model",
                "--no-people",
                DETECTOR_HINT,
            ),
            (
                self.caption,
                self.caption_model,
                "caption model",
                "--caption-model",
                "--no-caption",
                LLAVA_HINT,
            ),
        ]
        for on, folder, what, flag, off, hint in need:
            if on:
                if not folder:
                    raise ValueError(f"the {what} is on but has no model: pass {flag} DIR ({hint}) or {off}")
                check_model_folder(folder, what, hint)
        if self.pickscore_model:
            from .pickscore import check_clip_folder

            check_clip_folder(self.pickscore_model)
        return self

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> CurateConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown CurateConfig field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def fingerprint(self) -> str:
        """Hash of every field that changes the output (runtime fields may change on resume)."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Rows: plain dicts with a fixed schema (Ray Data stores them as Arrow tables).


def _row(part: int, pos: int, **kw) -> dict:
    row = {
        "part": part,
        "pos": pos,
        "end": False,
        "count": 0,
        "source_key": "",
        "caption": "",
        "has_caption": False,
        "meta": "{}",
        "image": b"",
        "thumb": b"",
        "rec": "{}",
        "reason": "",
        "score": 0.0,
        "detail": "",
    }
    row.update(kw)
    return row


def _item_row(part: int, pos: int, item: SourceItem) -> dict:
    return _row(
        part,
        pos,
        source_key=item.source_key,
        caption=item.caption or "",
        has_caption=item.caption is not None,
        meta=json.dumps(item.meta or {}, ensure_ascii=False, default=str),
        image=item.image_bytes or b"",
        reason="read_error" if item.error is not None else "",
        detail=item.error or "",
    )


def read_rows(source: Source, part: int) -> Iterator[dict]:
    """The rows of one part, then its end marker (``end=True``, ``count`` = items in the part)."""
    n = 0
    for n, item in enumerate(source.read_part(part), start=1):  # noqa: B007 (n is the count after the loop)
        yield _item_row(part, n - 1, item)
    yield _row(part, -1, end=True, count=n)


def _drop(
    row: dict, reason: str, score: float = 0.0, detail: str = "", image: Image.Image | None = None
) -> None:
    row.update(reason=reason, score=float(score), detail=detail, image=b"")
    if image is not None:
        t = _thumb(image, 128)
        row["thumb"] = jpeg_bytes(t, 85)


def _alive(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["end"] and not r["reason"]]


def _model_view(image: Image.Image, side: int) -> tuple[Image.Image, float]:
    """The image at most ``side`` px long (models resize anyway); the factor maps boxes back."""
    s = min(1.0, side / max(image.size))
    if s >= 1.0:
        return image, 1.0
    return image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BICUBIC), s


def cheap_stage(rows: list[dict], cfg: CurateConfig) -> list[dict]:
    """CPU: header checks, resolution filter, full decode. Alive rows get ``image`` = JPEG of the upright
    RGB photo (the source bytes when they already are that) and their resolution scores in ``rec``."""
    for row in _alive(rows):
        data = row["image"]
        try:
            head = read_header(data, cfg.max_pixels)
            scores = resolution_scores(head.width, head.height)
            rec = {"filters": dict(scores), "source_format": head.format, "source_mode": head.mode}
            bad = resolution_reason(scores, cfg.min_short_side, cfg.min_megapixels, cfg.max_aspect)
            if cfg.resolution_filter and bad is not None:
                small = decode_photo(data) if head.width * head.height <= 4e6 else None  # thumb if cheap
                _drop(row, bad[0], bad[1], f"{head.width}x{head.height}", small)
                continue
            image = decode_photo(data)
        except BadImage as e:
            _drop(row, e.reason, 0.0, e.detail)
            continue
        rec.update(width=image.width, height=image.height)
        upright_rgb_jpeg = (
            head.format == "JPEG" and head.mode == "RGB" and image.size == (head.width, head.height)
        )
        row["image"] = data if upright_rgb_jpeg else jpeg_bytes(image, cfg.jpeg_quality)
        row["rec"] = json.dumps(rec)
    return rows


@dataclass
class CurateModels:
    """The models one worker holds; built once per process / Ray actor."""

    sfw: ImageClassifier | None = None
    watermark: ImageClassifier | None = None
    people: PeopleDetector | None = None
    captioner: LlavaCaptioner | None = None
    pickscore: object | None = None  # mumu_core.data.pickscore.PickScorer

    @classmethod
    def load(cls, cfg: CurateConfig) -> CurateModels:
        m = cls()
        if cfg.sfw_filter:
            m.sfw = ImageClassifier.from_pretrained(
                cfg.sfw_model, cfg.sfw_labels, "sfw classifier", cfg.device, cfg.dtype
            )
        if cfg.watermark_filter:
            m.watermark = ImageClassifier.from_pretrained(
                cfg.watermark_model, cfg.watermark_labels, "watermark classifier", cfg.device, cfg.dtype
            )
        if cfg.people_filter:
            m.people = PeopleDetector.from_pretrained(
                cfg.people_model, cfg.people_labels, cfg.people_threshold, device=cfg.device, dtype=cfg.dtype
            )
        if cfg.caption:
            m.captioner = LlavaCaptioner.from_pretrained(
                cfg.caption_model, cfg.caption_prompt, cfg.caption_max_tokens, cfg.device, cfg.dtype
            )
        if cfg.pickscore_model:
            from .pickscore import PickScorer

            m.pickscore = PickScorer.from_pretrained(
                cfg.pickscore_model, cfg.pickscore_processor, device=cfg.device, batch_size=cfg.batch_size
            )
        return m

    def identities(self) -> dict:
        out = {}
        for k in ("sfw", "watermark", "people", "captioner"):
            m = getattr(self, k)
            if m is not None:
                out[k] = m.identity
        if self.pickscore is not None:
            out["pickscore"] = {"class": "PickScorer", "folder": self.pickscore.identity}
        return out


def _scale_box(box, s: float) -> list[float]:
    return [v / s for v in box]


def model_stage(rows: list[dict], cfg: CurateConfig, models: CurateModels) -> list[dict]:
    """Models over the alive rows, in cost order; each filter only sees what the previous kept."""
    live = _alive(rows)
    images = {id(r): decode_photo(r["image"]) for r in live}
    views = {i: _model_view(im, cfg.model_side) for i, im in images.items()}
    recs = {id(r): json.loads(r["rec"]) for r in live}

    for name, model, limit in (
        ("nsfw", models.sfw, cfg.max_nsfw),
        ("watermark", models.watermark, cfg.max_watermark),
    ):
        live = _alive(live)
        if model is None or not live:
            continue
        for r, p in zip(live, model.score([views[id(r)][0] for r in live]), strict=True):
            recs[id(r)]["filters"][name] = round(p, 6)
            if p > limit:
                _drop(r, name, p, f"P({name}) {p:.3f} > {limit}", views[id(r)][0])

    persons: dict[int, tuple[list[float], float] | None] = {}
    live = _alive(live)
    if models.people is not None and live:
        for r, found in zip(
            live, models.people.detect([views[id(r)][0] for r in live], cfg.people_threshold), strict=True
        ):
            im, s = images[id(r)], views[id(r)][1]
            boxes = [(_scale_box(b, s), sc) for b, sc in zip(found.boxes, found.scores, strict=True)]
            area = im.width * im.height
            boxes = [
                (b, sc) for b, sc in boxes if (b[2] - b[0]) * (b[3] - b[1]) >= cfg.people_min_area * area
            ]
            recs[id(r)]["filters"]["people"] = len(boxes)
            if len(boxes) > cfg.max_people:
                _drop(r, "people", len(boxes), f"{len(boxes)} persons > {cfg.max_people}", views[id(r)][0])
            else:
                persons[id(r)] = boxes[0] if len(boxes) == 1 else None

    live = _alive(live)
    crops: dict[int, Image.Image] = {}
    for r in live:
        im, rec = images[id(r)], recs[id(r)]
        person = persons.get(id(r))
        pbox = [round(v, 1) for v in person[0]] if person else None
        if cfg.crop:
            box, inside = person_crop_box(im.width, im.height, pbox, cfg.aspect_buckets)
        else:
            box, inside = [0, 0, im.width, im.height], pbox is not None
        crop = im.crop(tuple(box))
        scale = 1.0
        if cfg.max_side and max(crop.size) > cfg.max_side:
            scale = cfg.max_side / max(crop.size)
            crop = crop.resize(
                (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.LANCZOS
            )
        in_crop = None
        if pbox is not None:
            x0, y0, x1, y1 = pbox
            in_crop = [
                round(min(max(x0 - box[0], 0), box[2] - box[0]) * scale, 1),
                round(min(max(y0 - box[1], 0), box[3] - box[1]) * scale, 1),
                round(min(max(x1 - box[0], 0), box[2] - box[0]) * scale, 1),
                round(min(max(y1 - box[1], 0), box[3] - box[1]) * scale, 1),
            ]
        rec["crop"] = {
            "box": box,
            "mode": "person" if pbox is not None and cfg.crop else ("centre" if cfg.crop else "none"),
            "scale": round(scale, 6),
        }
        rec["person"] = (
            {"box": in_crop, "box_in_source": pbox, "score": round(person[1], 6), "inside_crop": inside}
            if pbox is not None
            else None
        )
        crops[id(r)] = crop

    captions: dict[int, str] = {}
    if models.captioner is not None and live:
        for r, c in zip(
            live,
            models.captioner.caption([_model_view(crops[id(r)], cfg.model_side)[0] for r in live]),
            strict=True,
        ):
            captions[id(r)] = c
    for r in live:
        if models.captioner is not None:
            if not captions[id(r)]:
                _drop(r, "empty_caption", 0.0, "the caption model returned no text", crops[id(r)])
        elif not r["has_caption"] or not r["caption"].strip():
            _drop(r, "no_caption", 0.0, "captioning is off and the source has no caption", crops[id(r)])
        else:
            captions[id(r)] = r["caption"].strip()

    live = _alive(live)
    if models.pickscore is not None and live:
        got = models.pickscore.score([crops[id(r)] for r in live], [captions[id(r)] for r in live])
        for r, p in zip(live, got, strict=True):
            recs[id(r)]["filters"]["pickscore"] = round(p, 4)
            if p < cfg.min_pickscore:
                _drop(r, "pickscore", p, f"{p:.2f} < {cfg.min_pickscore}", crops[id(r)])

    for r in _alive(live):
        crop, rec = crops[id(r)], recs[id(r)]
        rec.update(
            caption=captions[id(r)],
            original_caption=r["caption"] if r["has_caption"] else None,
            caption_model=models.captioner.identity if models.captioner is not None else None,
            width=crop.width,
            height=crop.height,
            source_width=rec.pop("width"),
            source_height=rec.pop("height"),
        )
        r["rec"] = json.dumps(rec, ensure_ascii=False)
        r["image"] = jpeg_bytes(crop, cfg.jpeg_quality)
    return rows


def run_model_stage(rows: list[dict], cfg: CurateConfig, models: CurateModels) -> list[dict]:
    """``model_stage`` that retries a failing batch row by row, so one bad image loses only itself."""
    try:
        return model_stage([dict(r) for r in rows], cfg, models)
    except Exception as e:
        if len(_alive(rows)) <= 1:
            out = [dict(r) for r in rows]
            for r in _alive(out):
                log.warning("dropping %s: %s", r["source_key"], e)
                _drop(r, "failed", 0.0, f"{type(e).__name__}: {e}")
            return out
        log.warning("batch of %d failed (%s); retrying one by one", len(rows), e)
        return [x for r in rows for x in run_model_stage([r], cfg, models)]


# --------------------------------------------------------------------------------------------------
# Writing


def _empty_stats() -> dict:
    return {"images_in": 0, "kept": 0, "reasons": {r: 0 for r in REASONS}, "dropped": [], "examples": {}}


class _OpenPart:
    def __init__(self, out_dir: Path, part: int):
        self.part, self.t0 = part, time.perf_counter()
        self.tar, self.stats_path = part_paths(out_dir, part)
        self.writer = ShardWriter(self.tar)
        self.next_pos, self.pending, self.count = 0, {}, None
        self.stats = _empty_stats()


class PartAssembler:
    """Consumes rows (any order within a part) and writes each part when its last row is in.

    Rows are written in position order, so shards are deterministic; a part is published only
    complete (shard, then its statistics), so a killed run leaves no partial part behind.
    """

    def __init__(self, out_dir: Path, cfg: CurateConfig, on_part: Callable[[dict], None] | None = None):
        self.out, self.cfg, self.on_part = out_dir, cfg, on_part
        self.open: dict[int, _OpenPart] = {}
        self.finished: list[dict] = []

    def add(self, row: dict) -> None:
        p = self.open.get(row["part"]) or self.open.setdefault(row["part"], _OpenPart(self.out, row["part"]))
        if row["end"]:
            p.count = row["count"]
        else:
            p.pending[row["pos"]] = row
        while p.next_pos in p.pending:
            self._write(p, p.pending.pop(p.next_pos))
            p.next_pos += 1
        if p.count is not None and p.next_pos == p.count:
            self._finish(p)

    def _write(self, p: _OpenPart, row: dict) -> None:
        st = p.stats
        st["images_in"] += 1
        key = f"c{row['part']:06d}-{row['pos']:06d}"
        if row["reason"]:
            st["reasons"][row["reason"]] += 1
            st["dropped"].append(
                {
                    "key": key,
                    "source_key": row["source_key"],
                    "reason": row["reason"],
                    "score": row["score"],
                    "detail": row["detail"],
                }
            )
            ex = st["examples"].setdefault(row["reason"], [])
            if row["thumb"] and len(ex) < self.cfg.examples_per_reason:
                ex.append({"key": key, "score": row["score"], "jpg": base64.b64encode(row["thumb"]).decode()})
            return
        rec = json.loads(row["rec"])
        meta = json.loads(row["meta"])
        rec = {"key": key, **rec, "source_key": row["source_key"]}
        if meta:
            rec["source_meta"] = {
                k: meta[k] for k in ("url", "key", "caption", "width", "height") if k in meta
            }
        try:
            # add() encodes everything before it writes a byte: an unstorable record (text that is
            # not valid Unicode) is dropped with its reason and the tar stays whole.
            files = {"jpg": row["image"], "txt": rec["caption"].encode("utf-8")}
            p.writer.add(Sample(key, rec, files))
        except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
            st["reasons"]["failed"] += 1
            st["dropped"].append(
                {
                    "key": key,
                    "source_key": row["source_key"],
                    "reason": "failed",
                    "score": 0.0,
                    "detail": f"bad record: {e}",
                }
            )
            return
        st["kept"] += 1

    def _finish(self, p: _OpenPart) -> None:
        size = p.writer.commit()
        p.stats.update(
            part=p.part,
            shard=p.tar.name,
            shard_bytes=size,
            seconds=round(time.perf_counter() - p.t0, 3),
            fingerprint=self.cfg.fingerprint(),
        )
        write_json_atomic(p.stats_path, p.stats)  # last: the "finished" marker
        del self.open[p.part]
        self.finished.append(p.stats)
        if self.on_part:
            self.on_part(p.stats)

    def close(self) -> None:
        """Discard unfinished parts (their temp files); the next run redoes them."""
        for p in list(self.open.values()):
            p.writer.__exit__(None, None, None)
        self.open.clear()


def _batches(rows: Iterable[dict], n: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for r in rows:
        batch.append(r)
        if sum(not x["end"] for x in batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_local(source, todo, cfg, models, emit) -> None:
    for part in todo:
        for batch in _batches(read_rows(source, part), cfg.batch_size):
            for r in run_model_stage(cheap_stage(batch, cfg), cfg, models):
                emit(r)


def _arrow_rows(table) -> list[dict]:
    return table.to_pylist()


def _ray_read_and_filter(row: dict, source: Source, cfg: dict) -> list[dict]:
    """The CPU stage on Ray: read one part and run ``cheap_stage`` over it (CPU tasks). It is one
    ``flat_map`` because Ray Data fuses a separate CPU ``map_batches`` into the model actors."""
    c = CurateConfig.from_dict(cfg)
    return [r for b in _batches(read_rows(source, int(row["part"])), c.batch_size) for r in cheap_stage(b, c)]


class _RayModelStage:
    """Ray Data actor: loads the models once (on its GPU when the cluster has them)."""

    def __init__(self, cfg: dict, torch_threads: int):
        import torch

        logging.basicConfig(level=logging.INFO)
        torch.set_num_threads(max(1, torch_threads))
        self.cfg = CurateConfig.from_dict(cfg)
        self.models = CurateModels.load(self.cfg)

    def __call__(self, table):
        import pyarrow as pa

        return pa.Table.from_pylist(run_model_stage(_arrow_rows(table), self.cfg, self.models))


def _run_ray(source, todo, cfg, emit, ray_address, num_workers) -> int:
    import ray

    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            # One CPU per model actor plus one for the read/decode tasks.
            ray.init(num_cpus=max(1, num_workers or 1) + 1, include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our bar shows images per second
        ctx.execution_options.preserve_order = True  # parts complete one after another on the driver
        gpus = int(ray.cluster_resources().get("GPU", 0))
        workers = (min(num_workers, gpus) if num_workers else gpus) if gpus else max(1, num_workers or 1)
        ds = ray.data.from_items([{"part": i} for i in todo], override_num_blocks=max(1, len(todo)))
        ds = ds.flat_map(_ray_read_and_filter, fn_kwargs={"source": source, "cfg": cfg.to_dict()}, num_cpus=1)
        ds = ds.map_batches(
            _RayModelStage,
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={"cfg": cfg.to_dict(), "torch_threads": 4 if gpus else 1},
            num_gpus=1 if gpus else 0,
            num_cpus=1,
        )
        for row in ds.iter_rows():
            emit(dict(row))
        return workers
    finally:
        if started_here:
            ray.shutdown()


def curate(
    source: Source,
    out_dir: str | Path,
    cfg: CurateConfig | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    models: CurateModels | None = None,
    on_part: Callable[[dict], None] | None = None,
    sheet: bool = True,
) -> dict:
    """Curate ``source`` into webdataset shards under ``out_dir``; return the manifest.

    Finished parts are skipped (resume = run the same command again). ``on_part`` is called after
    each part is published (tests use it to interrupt a run between parts).
    """
    from tqdm.auto import tqdm

    cfg = (cfg or CurateConfig()).validate()
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)  # of killed runs (their process is gone); live writers are left alone
    n_parts = source.num_parts()
    todo = [i for i in range(n_parts) if not is_finished(out, i, cfg)]
    skipped = n_parts - len(todo)
    if skipped:
        log.info("resuming: %d of %d parts already finished", skipped, n_parts)
    if todo and executor == "local" and models is None:
        models = CurateModels.load(cfg)  # before the clock and the bar: images/s counts images only
    t0 = time.perf_counter()
    bar = tqdm(unit="img", desc=f"curate ({executor})", disable=not progress)
    kept = 0

    def part_done(stats: dict) -> None:
        bar.set_postfix(parts=f"{skipped + len(asm.finished)}/{n_parts}", kept=kept)
        if on_part:
            on_part(stats)

    asm = PartAssembler(out, cfg, part_done)

    def emit(row: dict) -> None:
        nonlocal kept
        if not row["end"]:
            bar.update(1)
            kept += not row["reason"]
        asm.add(row)

    workers = 1
    try:
        if todo and executor == "local":
            _run_local(source, todo, cfg, models, emit)
        elif todo:
            workers = _run_ray(source, todo, cfg, emit, ray_address, num_workers)
    finally:
        asm.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    images_this_run = sum(s["images_in"] for s in asm.finished)
    manifest = write_manifest(out, source, cfg, n_parts, skipped, elapsed, images_this_run, executor, workers)
    if sheet and manifest["counts"]["images_in"]:
        manifest["contact_sheet"] = str(curate_contact_sheet(out, out / SHEET))
    return manifest


def write_manifest(
    out: Path, source, cfg, n_parts, skipped, elapsed, images_this_run, executor, workers
) -> dict:
    """Counts per reason over every finished part (this run's and earlier runs')."""
    total = _empty_stats()
    shards, missing = [], []
    for i, s in finished_part_stats(out, n_parts):
        if s is None:
            missing.append(i)
            continue
        total["images_in"] += s["images_in"]
        total["kept"] += s["kept"]
        for k, v in s["reasons"].items():
            total["reasons"][k] = total["reasons"].get(k, 0) + v
        total["dropped"].extend(s["dropped"][: max(0, 1000 - len(total["dropped"]))])
        shards.append({"shard": s["shard"], "images": s["kept"], "bytes": s["shard_bytes"]})
    manifest = {
        "format": "mumu-curate/1",
        "source": source.describe(),
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "executor": executor,
        "workers": workers,
        "parts": {
            "total": n_parts,
            "finished": len(shards),
            "skipped_as_finished": skipped,
            "unfinished": missing,
        },
        "counts": {
            "images_in": total["images_in"],
            "kept": total["kept"],
            "dropped": total["images_in"] - total["kept"],
        },
        "reasons": total["reasons"],
        "dropped": total["dropped"],  # the first 1000; every part's full list is in its shard-*.json
        "shards": shards,
        "seconds_this_run": round(elapsed, 3),
        "images_this_run": images_this_run,
        "images_per_second_this_run": round(images_this_run / elapsed, 3) if elapsed > 0 else None,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Contact sheet: kept examples (crop with the person box, caption) and dropped examples per reason.


def curate_contact_sheet(out_dir: str | Path, png: str | Path, per_reason: int = 4, side: int = 160) -> Path:
    out = Path(out_dir)
    rows: list[tuple[str, list[tuple[Image.Image, str]]]] = []
    kept = []
    for s in iter_samples(out):
        rec = json.loads(s["json"])
        im = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        if rec.get("person") and rec["person"]["box"]:
            ImageDraw.Draw(im).rectangle(
                rec["person"]["box"], outline=(40, 200, 60), width=max(2, im.width // 100)
            )
        kept.append((_thumb(im, side), rec["caption"]))
        if len(kept) == per_reason:
            break
    rows.append(("kept", kept))
    examples: dict[str, list[tuple[Image.Image, str]]] = {}
    for st in sorted(out.glob("shard-*.json")):
        for reason, exs in json.loads(st.read_text("utf-8")).get("examples", {}).items():
            got = examples.setdefault(reason, [])
            for e in exs:
                if len(got) < per_reason:
                    im = Image.open(io.BytesIO(base64.b64decode(e["jpg"]))).convert("RGB")
                    got.append((im, f"{e['key']} score {e['score']:.3g}"))
    rows += [(r, examples[r]) for r in REASONS if r in examples]
    label_w, cell_w, cell_h = 150, side + 12, side + 40
    sheet = Image.new("RGB", (label_w + per_reason * cell_w, max(1, len(rows)) * cell_h), "white")
    d = ImageDraw.Draw(sheet)
    for y, (name, cells) in enumerate(rows):
        top = y * cell_h
        d.text((6, top + side // 2), name, fill=(0, 0, 0), font=_font(16))
        for x, (im, text) in enumerate(cells):
            left = label_w + x * cell_w
            sheet.paste(_thumb(im, side), (left, top + 4))
            d.text((left, top + side + 8), text[:30], fill=(60, 60, 60), font=_font(11))
            d.text((left, top + side + 22), text[30:60], fill=(60, 60, 60), font=_font(11))
        d.line((0, top + cell_h - 1, sheet.width, top + cell_h - 1), fill=(200, 200, 200))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    write_bytes_atomic(png, buf.getvalue())
    return Path(png)
