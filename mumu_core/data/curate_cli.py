"""``python -m mumu_core.data curate``: the real-photo curation command (docs/DATA.md)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from .curate import CurateConfig

COMMANDS = ("curate",)


def _floats(text: str) -> tuple[float, ...]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if ":" in part:  # "4:3" -> 1.333
            w, h = part.split(":")
            out.append(float(w) / float(h))
        elif part:
            out.append(float(part))
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_commands(sub: argparse._SubParsersAction) -> None:
    d = CurateConfig()
    c = sub.add_parser(
        "curate",
        help="real photos -> SFW, high-res, unwatermarked, 0-1 person, person-centred, LLaVA-captioned shards",
        description="Filters (cheapest first, each switchable off): resolution, SFW, watermark, people count, "
        "optional PickScore; then a person-centred crop and a LLaVA 1.6 caption. Output: webdataset shards that "
        "`python -m mumu_core.data bootstrap --input OUT` reads, a manifest and a contact sheet.",
    )
    c.add_argument(
        "--input", nargs="+", required=True, help="image folder / img2dataset tar shards / parquet"
    )
    c.add_argument("--format", choices=["wds", "parquet", "folder"], help="default: guessed from --input")
    c.add_argument("--out", required=True, help="output folder (shards, shard-*.json, manifest.json, sheet)")
    c.add_argument("--image-column", help="parquet: the image column (bytes or a local path)")
    c.add_argument("--caption-column", help="parquet: the caption column (optional)")
    c.add_argument("--image-root", help="parquet: root of relative image paths")
    g = c.add_argument_group("resolution")
    g.add_argument("--no-resolution", action="store_true", help="switch the resolution filter off")
    g.add_argument("--min-short-side", type=int, default=d.min_short_side)
    g.add_argument("--min-megapixels", type=float, default=d.min_megapixels)
    g.add_argument("--max-aspect", type=float, default=d.max_aspect, help="long side / short side")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger images are never decoded")
    g = c.add_argument_group("SFW")
    g.add_argument(
        "--sfw-model", help="local AutoModelForImageClassification folder (Falconsai/nsfw_image_detection)"
    )
    g.add_argument("--no-sfw", action="store_true")
    g.add_argument("--sfw-labels", type=_names, default=d.sfw_labels, help="comma list (default nsfw)")
    g.add_argument("--max-nsfw", type=float, default=d.max_nsfw)
    g = c.add_argument_group("watermark")
    g.add_argument("--watermark-model", help="local image-classification folder (a watermark classifier)")
    g.add_argument("--no-watermark", action="store_true")
    g.add_argument("--watermark-labels", type=_names, default=d.watermark_labels)
    g.add_argument("--max-watermark", type=float, default=d.max_watermark)
    g = c.add_argument_group("people")
    g.add_argument(
        "--people-model", help="local object detector (RT-DETR / DETR / YOLOS) or GroundingDINO folder"
    )
    g.add_argument("--no-people", action="store_true")
    g.add_argument("--people-labels", type=_names, default=d.people_labels)
    g.add_argument("--people-threshold", type=float, default=d.people_threshold)
    g.add_argument("--people-min-area", type=float, default=d.people_min_area)
    g.add_argument("--max-people", type=int, default=d.max_people)
    g = c.add_argument_group("PickScore (optional)")
    g.add_argument("--pickscore-model", help="local PickScore CLIPModel folder; enables the minimum")
    g.add_argument("--pickscore-processor", help="its CLIPProcessor folder (default: the model folder)")
    g.add_argument("--min-pickscore", type=float, default=d.min_pickscore)
    g = c.add_argument_group("crop and caption")
    g.add_argument("--no-crop", action="store_true", help="keep the whole image")
    g.add_argument("--aspect-buckets", type=_floats, default=d.aspect_buckets, help="e.g. 1 or 1,4:3,3:4")
    g.add_argument("--max-side", type=int, default=d.max_side, help="downscale stored crops (0 = keep)")
    g.add_argument("--caption-model", help="local LLaVA 1.6 folder (llava-hf/llava-v1.6-mistral-7b-hf)")
    g.add_argument("--no-caption", action="store_true", help="keep the source captions instead")
    g.add_argument("--caption-prompt", default=d.caption_prompt)
    g.add_argument("--caption-max-tokens", type=int, default=d.caption_max_tokens)
    g = c.add_argument_group("runtime")
    g.add_argument("--executor", choices=["local", "ray"], default="local")
    g.add_argument("--ray-address", help="join a running Ray cluster (implies --executor ray)")
    g.add_argument("--num-workers", type=int, help="Ray model actors (default: one per GPU, or 1)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--images-per-part", type=int, default=d.images_per_part)
    g.add_argument("--device", default=d.device)
    g.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    g.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> CurateConfig:
    return CurateConfig(
        resolution_filter=not args.no_resolution,
        min_short_side=args.min_short_side,
        min_megapixels=args.min_megapixels,
        max_aspect=args.max_aspect,
        max_pixels=args.max_pixels,
        sfw_filter=not args.no_sfw,
        sfw_model=args.sfw_model,
        sfw_labels=args.sfw_labels,
        max_nsfw=args.max_nsfw,
        watermark_filter=not args.no_watermark,
        watermark_model=args.watermark_model,
        watermark_labels=args.watermark_labels,
        max_watermark=args.max_watermark,
        people_filter=not args.no_people,
        people_model=args.people_model,
        people_labels=args.people_labels,
        people_threshold=args.people_threshold,
        people_min_area=args.people_min_area,
        max_people=args.max_people,
        pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor,
        min_pickscore=args.min_pickscore,
        crop=not args.no_crop,
        aspect_buckets=args.aspect_buckets,
        max_side=args.max_side,
        caption=not args.no_caption,
        caption_model=args.caption_model,
        caption_prompt=args.caption_prompt,
        caption_max_tokens=args.caption_max_tokens,
        batch_size=args.batch_size,
        images_per_part=args.images_per_part,
        device=args.device,
        dtype=args.dtype,
    )


def build_source(args: argparse.Namespace):
    from .sources import FolderSource, ParquetSource, WebDatasetSource

    fmt = args.format
    if fmt is None:
        p = Path(args.input[0])
        if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
            fmt = "wds"
        elif p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
            fmt = "parquet"
        elif p.is_dir():
            fmt = "folder"
        else:
            raise ValueError(f"cannot tell the input format of {p}: pass --format wds|parquet|folder")
    if fmt == "wds":
        return WebDatasetSource(args.input, captions_required=False)
    if fmt == "parquet":
        return ParquetSource(
            args.input, args.image_column, args.caption_column, args.image_root, captions_required=False
        )
    if len(args.input) != 1:
        raise ValueError("--format folder takes exactly one --input folder")
    return FolderSource(args.input[0], images_per_part=args.images_per_part, captions_required=False)


def _sigterm_as_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from .curate import curate

    try:
        cfg = config_from_args(args).validate()
        source = build_source(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        manifest = curate(
            source,
            args.out,
            cfg,
            executor="ray" if args.ray_address else args.executor,
            ray_address=args.ray_address,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("interrupted: finished parts are kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    reasons = {k: v for k, v in manifest["reasons"].items() if v}
    print(json.dumps({"out": args.out, **manifest["counts"], "reasons": reasons, "parts": manifest["parts"]}))
    return 0
