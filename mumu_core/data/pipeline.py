"""The bootstrap pipeline: one pure batch function, one part -> shard function, and two drivers.

- ``bootstrap_batch(entries, cfg, models)``: decoded in memory, no IO: items in -> ``Sample``s out.
- ``process_part(source, index, out_dir, cfg, models)``: reads one part, runs ``bootstrap_batch`` per
  ``cfg.batch_size`` images, writes ``shard-{index:06d}.tar`` then ``shard-{index:06d}.json`` (its
  statistics), both atomically. The statistics file is the "finished" marker for resuming.
- ``bootstrap(source, out_dir, cfg, executor="local" | "ray")``: skips finished parts, runs the rest
  in process or on Ray Data (one model-holding actor per GPU, or ``num_workers`` CPU actors),
  then writes ``manifest.json`` with counts and filter statistics over all parts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from .config import BootstrapConfig
from .controls import DepthEstimator, canny, xdog_sketch
from .detect import GroundingDinoDetector
from .phrases import Phrase, extract_phrases, is_person_phrase
from .rules import REASONS, Candidate, apply_rules, build_prompt, clip_box, summarize
from .shards import Sample, ShardWriter, write_json_atomic
from .sources import Source, SourceItem

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass
class Models:
    """The models one worker holds. Built once per process / Ray actor."""

    detector: GroundingDinoDetector | None = None
    depth: DepthEstimator | None = None

    @classmethod
    def load(cls, cfg: BootstrapConfig, need_detector: bool) -> Models:
        detector = None
        if need_detector:
            if not cfg.detector_path:
                raise ValueError(
                    "this source has no boxes, so it needs a detector: pass detector_path / --detector "
                    "(a local GroundingDINO folder, see docs/DATA.md 'Where weights go')"
                )
            detector = GroundingDinoDetector.from_pretrained(cfg.detector_path, cfg.device, cfg.dtype)
        depth = None
        if "depth" in cfg.controls:
            depth = DepthEstimator.from_pretrained(cfg.depth_path, cfg.device, cfg.dtype)
        return cls(detector, depth)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, jpeg_quality: int = 95) -> tuple[Image.Image, bytes]:
    """Decode and orient an image; return (RGB image, JPEG bytes that show exactly that image).

    A JPEG that needs no rotation or colour conversion is stored as-is (no second lossy pass);
    anything else is re-encoded, so the stored ``jpg`` always matches the boxes.
    """
    src = Image.open(io.BytesIO(data))
    src.load()  # decode now: a truncated file must fail here, inside the per-image try
    upright = src.getexif().get(0x0112, 1) == 1  # EXIF orientation tag: 1 = no rotation needed
    rgb = (src if upright else ImageOps.exif_transpose(src)).convert("RGB")
    if src.format == "JPEG" and src.mode == "RGB" and upright:
        return rgb, data
    buf = io.BytesIO()
    # 4:4:4 chroma: the default 4:2:0 shifts the colours of small objects (up to 129/255 on the mini
    # world's 24 px scenes) and can merge objects a pixel or two apart.
    rgb.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0)
    return rgb, buf.getvalue()


def _empty_stats() -> dict:
    return {
        "images_in": 0,
        "images_out": 0,
        "errors": [],
        "objects": 0,
        "filter": {"kept": 0, **{r: 0 for r in REASONS}},
        "person_objects": 0,
        "head_crops": 0,
        "crop_files": 0,
    }


def _merge_stats(a: dict, b: dict) -> dict:
    for k in ("images_in", "images_out", "objects", "person_objects", "head_crops", "crop_files"):
        a[k] += b[k]
    a["errors"].extend(b["errors"])
    for k, v in b["filter"].items():
        a["filter"][k] = a["filter"].get(k, 0) + v
    return a


def _phrases_for(item: SourceItem, cfg: BootstrapConfig) -> list[Phrase]:
    """Caller-supplied phrases when the item has them, else the rule-based chunker's."""
    if item.phrases is not None:
        return [Phrase(p["phrase"], tuple(p["span"])) for p in item.phrases][: cfg.max_phrases]
    return extract_phrases(item.caption or "")[: cfg.max_phrases]


def _detect_heads(
    detector: GroundingDinoDetector, crops: list[tuple[Image.Image, tuple[int, int]]], cfg: BootstrapConfig
) -> list[tuple[list[int], float] | None]:
    """Best "head" box inside each person crop, mapped back to image pixels, or None."""
    out: list[tuple[list[int], float] | None] = []
    for s in range(0, len(crops), cfg.batch_size):
        chunk = crops[s : s + cfg.batch_size]
        res = detector.detect([c for c, _ in chunk], [list(cfg.head_prompt)] * len(chunk))
        for (crop, (ox, oy)), per_phrase in zip(chunk, res, strict=True):
            found = [r for r in per_phrase if r is not None and r[1] >= cfg.head_threshold]
            if not found:
                out.append(None)
                continue
            box, score = max(found, key=lambda r: r[1])
            x0, y0, x1, y1 = clip_box(box, *crop.size)
            if min(x1 - x0, y1 - y0) < cfg.head_min_side:
                out.append(None)  # a sliver at the crop's edge is no head
                continue
            out.append(([x0 + ox, y0 + oy, x1 + ox, y1 + oy], score))
    return out


def bootstrap_batch(
    entries: Sequence[tuple[str, SourceItem]], cfg: BootstrapConfig, models: Models
) -> tuple[list[Sample], dict]:
    """Ground, filter, crop and render controls for one batch. Pure: no file IO.

    ``entries`` are ``(output key, source item)``. An item that cannot be decoded is reported in
    the returned statistics' ``errors`` and produces no sample; the others are unaffected.
    """
    stats = _empty_stats()
    decoded: list[tuple[str, SourceItem, Image.Image, bytes]] = []
    for key, item in entries:
        stats["images_in"] += 1
        if item.error is not None:
            stats["errors"].append({"key": key, "source_key": item.source_key, "error": item.error})
            continue
        try:
            image, jpg = decode_image(item.image_bytes or b"", cfg.jpeg_quality)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            log.warning("skipping %s (%s): cannot decode image: %s", key, item.source_key, e)
            stats["errors"].append({"key": key, "source_key": item.source_key, "error": f"bad image: {e}"})
            continue
        decoded.append((key, item, image, jpg))

    # Detection for the items without known boxes, in one batched forward pass.
    det_idx = [i for i, (_, item, _, _) in enumerate(decoded) if item.objects is None]
    phrase_lists = {i: _phrases_for(decoded[i][1], cfg) for i in det_idx}
    det_results: dict[int, list] = {}
    if det_idx:
        if models.detector is None:
            raise ValueError("items without known boxes need a detector (Models.detector is None)")
        res = models.detector.detect(
            [decoded[i][2] for i in det_idx], [[p.text for p in phrase_lists[i]] for i in det_idx]
        )
        det_results = dict(zip(det_idx, res, strict=True))

    all_objects: list[list[dict]] = []
    for i, (_key, item, image, _) in enumerate(decoded):
        if item.objects is not None:
            cands = [
                Candidate(
                    o["phrase"],
                    tuple(o["span"]),
                    o["box"],
                    o["score"],
                    o["label"],
                    o["is_person"],
                    o["head_box"],
                )
                for o in item.objects
            ]
        else:
            cands = []
            for p, r in zip(phrase_lists[i], det_results[i], strict=True):
                box, score = r if r is not None else (None, 0.0)
                cands.append(Candidate(p.text, p.span, box, score, p.text.lower(), is_person_phrase(p.text)))
        objs = apply_rules(cands, image.width, image.height, cfg)
        for j, o in enumerate(objs):
            # Crops are written for kept objects and for those cut only by the 3-crop limit, so
            # training may re-choose which crops go in a prompt.
            if o["kept"] or o["reason"] == "over_limit":
                o["crop"] = f"crop{j}.png"
        all_objects.append(objs)

    # Head boxes: known ones were clipped by the rules; the rest come from the detector.
    want: list[tuple[int, int]] = []
    for i, objs in enumerate(all_objects):
        for j, o in enumerate(objs):
            if o["is_person"] and o["crop"] and o["head_box"] is None and decoded[i][1].objects is None:
                want.append((i, j))
    if want and cfg.head_detection and models.detector is not None:
        crops = []
        for i, j in want:
            b = all_objects[i][j]["box"]
            crops.append((decoded[i][2].crop(tuple(b)), (b[0], b[1])))
        for (i, j), found in zip(want, _detect_heads(models.detector, crops, cfg), strict=True):
            if found is not None:
                all_objects[i][j]["head_box"] = found[0]

    depth_maps = (
        models.depth.estimate([d[2] for d in decoded]) if models.depth is not None and decoded else []
    )
    samples: list[Sample] = []
    for i, (key, item, image, jpg) in enumerate(decoded):
        objs = all_objects[i]
        files: dict[str, bytes] = {"jpg": jpg}
        for j, o in enumerate(objs):
            if o["crop"]:
                files[o["crop"]] = _png(image.crop(tuple(o["box"])))
                stats["crop_files"] += 1
            hb = o["head_box"]
            if o["is_person"] and o["crop"]:
                stats["person_objects"] += 1
                if hb is not None and min(hb[2] - hb[0], hb[3] - hb[1]) >= cfg.head_min_side:
                    o["head_crop"] = f"head{j}.png"
                    files[o["head_crop"]] = _png(image.crop(tuple(hb)))
                    stats["head_crops"] += 1
        controls: dict[str, str] = {}
        if "canny" in cfg.controls:
            files["canny.png"] = _png(canny(image, cfg.canny_low, cfg.canny_high))
            controls["canny"] = "canny.png"
        if "depth" in cfg.controls:
            files["depth.png"] = _png(depth_maps[i])
            controls["depth"] = "depth.png"
        if "sketch" in cfg.controls:
            files["sketch.png"] = _png(xdog_sketch(image, cfg.sketch_sigma))
            controls["sketch"] = "sketch.png"
        record = {
            "key": key,
            "caption": item.caption,
            "width": image.width,
            "height": image.height,
            "objects": objs,
            "controls": controls,
            "prompt": build_prompt(item.caption or "", objs),
            "source_key": item.source_key,
            "boxes_from": "known" if item.objects is not None else "detector",
        }
        for k, v in summarize(objs).items():
            stats["filter"][k] += v
        stats["objects"] += len(objs)
        stats["images_out"] += 1
        samples.append(Sample(key, record, files))
    return samples, stats


def part_paths(out_dir: str | Path, index: int) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"shard-{index:06d}.tar", out / f"shard-{index:06d}.json"


def finished_part_stats(out_dir: str | Path, n_parts: int) -> Iterator[tuple[int, dict | None]]:
    """(index, statistics) of parts 0..n_parts-1; None for a part without both its shard and statistics.

    bootstrap, synth, score and curate all write part i as ``shard-i.tar`` + ``shard-i.json``; their
    manifests total the statistics of every finished part, this run's and earlier runs'.
    """
    for i in range(n_parts):
        tar, st = part_paths(out_dir, i)
        yield i, json.loads(st.read_text("utf-8")) if tar.is_file() and st.is_file() else None


def is_finished(out_dir: str | Path, index: int, cfg: BootstrapConfig) -> bool:
    """A part is finished when its shard and statistics exist; a different config is an error."""
    tar, st = part_paths(out_dir, index)
    if not (tar.is_file() and st.is_file()):
        return False
    fp = json.loads(st.read_text("utf-8")).get("fingerprint")
    if fp != cfg.fingerprint():
        raise ValueError(
            f"{st} was made with another config (fingerprint {fp}, now {cfg.fingerprint()}); "
            "use a new output folder, or delete the old shards to rebuild them"
        )
    return True


def process_part(
    source: Source,
    index: int,
    out_dir: str | Path,
    cfg: BootstrapConfig,
    models: Models,
    on_images: Callable[[int], None] | None = None,
) -> dict:
    """Bootstrap part ``index`` of ``source`` into ``out_dir``; return its statistics.

    Keys are ``s{part:06d}-{position:06d}``, position counting every input item (also unreadable
    ones), so a key never depends on which other items failed. If a whole batch fails in a model,
    its items are retried one by one so only the offending image is lost (and logged).
    """
    t0 = time.perf_counter()
    stats = _empty_stats()
    tar, st = part_paths(out_dir, index)

    def run(batch: list[tuple[str, SourceItem]], writer: ShardWriter) -> None:
        try:
            got, bst = bootstrap_batch(batch, cfg, models)
        except Exception as e:
            if len(batch) == 1:
                key, item = batch[0]
                log.warning("skipping %s (%s): %s", key, item.source_key, e)
                bst = _empty_stats()
                bst["images_in"] = 1
                bst["errors"].append({"key": key, "source_key": item.source_key, "error": f"failed: {e}"})
                _merge_stats(stats, bst)
                return
            log.warning("batch of %d failed (%s); retrying its images one by one", len(batch), e)
            for entry in batch:
                run([entry], writer)
            return
        for sample in got:
            try:
                # add() encodes the record before it writes a byte, so a record that cannot be
                # stored (e.g. text that is not valid Unicode) is skipped and the tar stays whole.
                writer.add(sample)
            except (ValueError, TypeError) as e:  # UnicodeEncodeError is a ValueError
                source_key = sample.record.get("source_key")
                log.warning("skipping %s (%s): cannot store its record: %s", sample.key, source_key, e)
                bst["images_out"] -= 1
                bst["errors"].append(
                    {"key": sample.key, "source_key": source_key, "error": f"bad record: {e}"}
                )
        _merge_stats(stats, bst)

    with ShardWriter(tar) as writer:
        batch: list[tuple[str, SourceItem]] = []
        for pos, item in enumerate(source.read_part(index)):
            batch.append((f"s{index:06d}-{pos:06d}", item))
            if len(batch) == cfg.batch_size:
                run(batch, writer)
                if on_images:
                    on_images(len(batch))
                batch = []
        if batch:
            run(batch, writer)
            if on_images:
                on_images(len(batch))
        for e in stats["errors"]:
            log.warning("part %d: %s (%s): %s", index, e["key"], e["source_key"], e["error"])
        size = writer.commit()
    stats.update(
        part=index,
        shard=tar.name,
        shard_bytes=size,
        seconds=round(time.perf_counter() - t0, 3),
        fingerprint=cfg.fingerprint(),
    )
    # The statistics file goes last: it is the "finished" marker, so a crash between the two
    # renames leaves a part that is simply redone.
    write_json_atomic(st, stats)
    return stats


class _RayPartWorker:
    """Ray Data actor: loads the models once, then turns part indexes into shards."""

    def __init__(self, source: Source, out_dir: str, cfg: dict, need_detector: bool, torch_threads: int):
        import torch

        logging.basicConfig(level=logging.INFO)
        torch.set_num_threads(max(1, torch_threads))
        self.source, self.out_dir = source, out_dir
        self.cfg = BootstrapConfig.from_dict(cfg)
        self.models = Models.load(self.cfg, need_detector)

    def __call__(self, batch: dict) -> dict:
        out = []
        for idx in batch["part"]:
            out.append(
                json.dumps(_safe_process_part(self.source, int(idx), self.out_dir, self.cfg, self.models))
            )
        return {"stats": out}


def _safe_process_part(
    source: Source, index: int, out_dir, cfg: BootstrapConfig, models: Models, on_images=None
) -> dict:
    """``process_part`` that reports a failure instead of raising, so one part never stops the job."""
    try:
        return process_part(source, index, out_dir, cfg, models, on_images)
    except Exception as e:
        log.exception("part %d failed; it has no output and will be retried by the next run", index)
        return {"part": index, "failed": f"{type(e).__name__}: {e}"}


def _run_local(source, todo, out_dir, cfg, need_detector, progress, models) -> list[dict]:
    from tqdm.auto import tqdm

    models = models or Models.load(cfg, need_detector)
    results = []
    with tqdm(unit="img", desc="bootstrap", disable=not progress) as bar:
        for n, idx in enumerate(todo):
            results.append(_safe_process_part(source, idx, out_dir, cfg, models, bar.update))
            bar.set_postfix(parts=f"{n + 1}/{len(todo)}")
    return results


def _run_ray(source, todo, out_dir, cfg, need_detector, progress, ray_address, num_workers) -> list[dict]:
    from .ray_driver import run_parts_on_ray

    kwargs = {"source": source, "out_dir": str(out_dir), "cfg": cfg.to_dict(), "need_detector": need_detector}
    return run_parts_on_ray(_RayPartWorker, kwargs, todo, "bootstrap", progress, ray_address, num_workers)


def remove_stale_temp_files(out: Path) -> list[Path]:
    """Delete the temp files (``.shard-*.tar.tmp-PID-*`` and the like) a killed run left behind.

    A temp file names the process that writes it; one whose process no longer runs on this host is
    garbage (SIGKILL, a lost node, a crash below Python). Files of live processes are left alone, so
    a second bootstrap into the same folder does not break a running one.
    """
    removed = []
    for p in out.glob(".*.tmp-*"):
        m = re.fullmatch(r"\..+\.tmp-(\d+)-[0-9a-f]+", p.name)
        if not m or not p.is_file() or _pid_alive(int(m.group(1))):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.info(
            "removed %d temp file(s) of an earlier, killed run: %s", len(removed), [p.name for p in removed]
        )
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def bootstrap(
    source: Source,
    out_dir: str | Path,
    cfg: BootstrapConfig | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    models: Models | None = None,
) -> dict:
    """Bootstrap ``source`` into webdataset shards under ``out_dir``; return the manifest.

    Finished parts (shard + statistics present, same config fingerprint) are skipped, so an
    interrupted job is resumed by running the same command again. ``num_workers`` (Ray only):
    None = one actor per GPU on a GPU cluster, else 1. ``models`` lets tests and
    callers pass already-loaded models to the local executor.
    """
    cfg = (cfg or BootstrapConfig()).validate()
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    need_detector = source.needs_detector
    if need_detector and not cfg.detector_path and (models is None or models.detector is None):
        raise ValueError(
            f"source {source.name!r} has no boxes, so it needs a detector: pass --detector / detector_path "
            "(a local GroundingDINO folder, see docs/DATA.md 'Where weights go')"
        )
    n_parts = source.num_parts()
    remove_stale_temp_files(out)
    todo = [i for i in range(n_parts) if not is_finished(out, i, cfg)]
    skipped = n_parts - len(todo)
    if skipped:
        log.info("resuming: %d of %d parts already finished", skipped, n_parts)
    t0 = time.perf_counter()
    if not todo:
        results = []
    elif executor == "local":
        results = _run_local(source, todo, out, cfg, need_detector, progress, models)
    else:
        results = _run_ray(source, todo, out, cfg, need_detector, progress, ray_address, num_workers)
    elapsed = time.perf_counter() - t0
    failed = [r for r in results if "failed" in r]
    return write_manifest(out, source, cfg, n_parts, skipped, failed, elapsed, executor)


def write_manifest(
    out: Path, source: Source, cfg: BootstrapConfig, n_parts, skipped, failed, elapsed, executor
) -> dict:
    """Aggregate every finished part's statistics (this run's and earlier runs') into manifest.json."""
    total = _empty_stats()
    shards = []
    for _, s in finished_part_stats(out, n_parts):
        if s is not None:
            _merge_stats(total, s)
            shards.append({"shard": s["shard"], "images": s["images_out"], "bytes": s["shard_bytes"]})
    reasons = Counter(e["error"].split(":")[0] for e in total["errors"])
    manifest = {
        "format": "mumu-bootstrap/1",
        "source": source.describe(),
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "executor": executor,
        "parts": {
            "total": n_parts,
            "finished": len(shards),
            "skipped_as_finished": skipped,
            "failed": [{"part": f["part"], "error": f["failed"]} for f in failed],
        },
        "counts": {
            "images_in": total["images_in"],
            "images_out": total["images_out"],
            "images_skipped": len(total["errors"]),
            "objects": total["objects"],
            "crop_files": total["crop_files"],
            "person_objects": total["person_objects"],
            "head_crops": total["head_crops"],
        },
        "filter": total["filter"],
        "error_kinds": dict(reasons),
        "errors": total["errors"][:1000],  # the full list is in each part's shard-*.json
        "controls": list(cfg.controls),
        "shards": shards,
        "seconds_this_run": round(elapsed, 3),
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
