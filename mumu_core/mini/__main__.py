"""``python -m mumu_core.mini {bootstrap,preview}``: mini-world shards and a look at the world.

    python -m mumu_core.mini bootstrap --out data/mini --count 50000
    python -m mumu_core.mini preview --out mini_preview.png

The analyser and the evaluation have their own CLIs: ``python -m mumu_core.mini.analyser`` and
``python -m mumu_core.mini.evaluate``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .world import DEFAULT_WORLD, SPLITS, bootstrap_config, bootstrap_source, render_batch, scene_at


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bootstrap", help="render scenes and bootstrap them into shards (known boxes)")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--count", type=int, required=True)
    b.add_argument("--start", type=int, default=0)
    b.add_argument("--split", default="train", choices=sorted(SPLITS))
    b.add_argument("--images-per-part", type=int, default=5000)
    b.add_argument("--no-background", action="store_true", help="no background (style) reference boxes")
    p = sub.add_parser("preview", help="a grid of scenes with their captions printed")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--split", default="train", choices=sorted(SPLITS))
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--scale", type=int, default=4)
    args = ap.parse_args(argv)

    if args.cmd == "bootstrap":
        from ..data.pipeline import bootstrap

        if args.count < 1:
            ap.error("--count must be >= 1")
        source = bootstrap_source(
            args.split,
            args.count,
            args.start,
            images_per_part=args.images_per_part,
            include_background=not args.no_background,
        )
        manifest = bootstrap(source, args.out, bootstrap_config(extra={"mini_world": True}), progress=True)
        print(json.dumps({k: manifest[k] for k in ("filter",) if k in manifest}, indent=2))
        print(f"wrote shards to {args.out}")
        return 0

    n = args.rows * args.rows
    scenes = [scene_at(args.split, i) for i in range(n)]
    c = DEFAULT_WORLD.canvas
    grid = render_batch(scenes).reshape(args.rows, args.rows, c, c, 3).transpose(0, 2, 1, 3, 4)
    img = Image.fromarray(np.ascontiguousarray(grid).reshape(args.rows * c, args.rows * c, 3))
    img.resize((img.width * args.scale, img.height * args.scale), Image.NEAREST).save(args.out)
    for i, s in enumerate(scenes):
        print(f"{i:3d}  {s.caption:45s}  {', '.join(o.label for o in s.objects)}  [{s.background.style}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
