"""``python -m mumu_core.data {bootstrap,contact-sheet,prompts,synth,score}`` (see docs/DATA.md)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from ..cli_help import plain
from .config import BootstrapConfig


def _build_source(args: argparse.Namespace):
    from .sources import FolderSource, KnownBoxesSource, ParquetSource, WebDatasetSource

    fmt = args.format
    if fmt == "wds":
        return WebDatasetSource(args.input)
    if fmt == "parquet":
        return ParquetSource(args.input, args.image_column, args.caption_column, args.image_root)
    if fmt == "folder":
        if len(args.input) != 1:
            raise SystemExit("--format folder takes exactly one --input folder")
        return FolderSource(args.input[0], images_per_part=args.images_per_part)
    if fmt == "coco":
        if len(args.input) != 1 or not args.image_root:
            raise SystemExit("--format coco takes one --input instances.json and --image-root IMAGES_DIR")
        return KnownBoxesSource.from_coco(
            args.input[0], args.image_root, images_per_part=args.images_per_part
        )
    raise SystemExit(f"unknown --format {fmt}")


def _guess_format(paths: Sequence[str]) -> str:
    from pathlib import Path

    p = Path(paths[0])
    if p.suffix == ".tar" or (p.is_dir() and any(p.glob("*.tar"))):
        return "wds"
    if p.suffix == ".parquet" or (p.is_dir() and any(p.glob("*.parquet"))):
        return "parquet"
    if p.suffix == ".json":
        return "coco"
    if p.is_dir():
        return "folder"
    raise SystemExit(f"cannot tell the input format of {p}: pass --format wds|parquet|folder|coco")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.data", description=plain(__doc__))
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = BootstrapConfig()
    b = sub.add_parser("bootstrap", help="text-image pairs -> grounded webdataset shards")
    b.add_argument(
        "--input", nargs="+", required=True, help="tar shards / parquet files / image folder / COCO json"
    )
    b.add_argument(
        "--format", choices=["wds", "parquet", "folder", "coco"], help="default: guessed from --input"
    )
    b.add_argument("--out", required=True, help="output folder (shards, per-shard stats, manifest.json)")
    b.add_argument("--detector", help="local GroundingDINO folder (HF format)")
    b.add_argument("--depth-model", help="local depth-estimation folder (HF format), enables 'depth'")
    b.add_argument(
        "--controls", default=None, help="comma list of canny,sketch,depth (default canny,sketch[,depth])"
    )
    b.add_argument("--executor", choices=["local", "ray"], default="local")
    b.add_argument("--ray-address", help="join a running Ray cluster (implies --executor ray)")
    b.add_argument("--num-workers", type=int, help="Ray actors (default: one per GPU, or 1 without GPUs)")
    b.add_argument("--batch-size", type=int, default=d.batch_size)
    b.add_argument("--images-per-part", type=int, default=d.images_per_part)
    b.add_argument("--min-crop-side", type=int, default=d.min_crop_side)
    b.add_argument("--max-crop-area", type=float, default=d.max_crop_area_frac)
    b.add_argument("--max-crops", type=int, default=d.max_crops)
    b.add_argument("--box-threshold", type=float, default=d.box_threshold)
    b.add_argument("--head-threshold", type=float, default=d.head_threshold)
    b.add_argument("--no-head-detection", action="store_true")
    b.add_argument("--device", default=d.device)
    b.add_argument("--dtype", default=d.dtype, choices=["float32", "float16", "bfloat16"])
    b.add_argument("--image-column")
    b.add_argument("--caption-column")
    b.add_argument("--image-root", help="parquet: root of relative image paths; coco: the images folder")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("contact-sheet", help="render N bootstrapped samples to PNG (and HTML)")
    c.add_argument("--shards", required=True, help="the bootstrap output folder")
    c.add_argument("--out", required=True, help="PNG path")
    c.add_argument("--html", help="also write a self-contained HTML page here")
    c.add_argument("-n", type=int, default=8)

    from . import synth_cli

    synth_cli.add_commands(sub)

    from . import curate_cli

    curate_cli.add_commands(sub)

    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.cmd in curate_cli.COMMANDS:
        return curate_cli.run(args)

    if args.cmd in synth_cli.COMMANDS:
        return synth_cli.run(args)
    if args.cmd == "contact-sheet":
        from .contact_sheet import contact_sheet

        print(contact_sheet(args.shards, args.out, n=args.n, html=args.html))
        return 0

    from .pipeline import bootstrap

    controls = (
        tuple(x.strip() for x in args.controls.split(",") if x.strip())
        if args.controls is not None
        else ("canny", "sketch") + (("depth",) if args.depth_model else ())
    )
    cfg = BootstrapConfig(
        min_crop_side=args.min_crop_side,
        max_crop_area_frac=args.max_crop_area,
        max_crops=args.max_crops,
        detector_path=args.detector,
        box_threshold=args.box_threshold,
        batch_size=args.batch_size,
        head_detection=not args.no_head_detection,
        head_threshold=args.head_threshold,
        controls=controls,
        depth_path=args.depth_model,
        device=args.device,
        dtype=args.dtype,
        images_per_part=args.images_per_part,
    )
    try:
        cfg.validate()
        source = _build_source(
            argparse.Namespace(**{**vars(args), "format": args.format or _guess_format(args.input)})
        )
        executor = "ray" if args.ray_address else args.executor
        _sigterm_as_interrupt()
        manifest = bootstrap(
            source,
            args.out,
            cfg,
            executor=executor,
            ray_address=args.ray_address,
            num_workers=args.num_workers,
            progress=not args.no_progress,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the part being written deleted its temp file on the way out
        print("interrupted: finished parts are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(
        json.dumps(
            {"out": args.out, **manifest["counts"], "filter": manifest["filter"], "parts": manifest["parts"]}
        )
    )
    return 1 if manifest["parts"]["failed"] else 0


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a scheduler's stop, ``kill``) unwinds like Ctrl-C, so temp files are cleaned up."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    raise SystemExit(main())
