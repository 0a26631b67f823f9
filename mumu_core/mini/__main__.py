"""``python -m mumu_core.mini COMMAND``: the mini world and model (``--help`` lists every command).

    python -m mumu_core.mini bootstrap --out data/mini --count 50000
    python -m mumu_core.mini preview --out mini_preview.png
    python -m mumu_core.mini demo --out outputs/demo          # the shipped model on the bundled prompts
    python -m mumu_core.mini ship --export runs/mini/train/export/step_N [--recipe runs/mini/recipe.json]
    python -m mumu_core.mini demo-assets                      # rewrites mumu_core/mini/demo/

The analyser, the evaluation, the conditioning probe and the base models have their own modules, run as
sub-commands (``python -m mumu_core.mini evaluate ...`` = ``python -m mumu_core.mini.evaluate ...``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..cli_help import first_line
from .world import DEFAULT_WORLD, SPLITS, bootstrap_config, bootstrap_source, render_batch, scene_at

# Sub-commands whose module has its own CLI: ``python -m mumu_core.mini NAME ARGS`` runs that module's
# main(ARGS). Listed here once, so ``--help`` shows every one (add new ones to this table).
DELEGATED: dict[str, tuple[str, str]] = {
    "analyser": ("analyser", "the object/style analyser of generated images: train, check"),
    "evaluate": ("evaluate", "the mini evaluation suites (single, pair, tokens, style) of a model"),
    "probe": ("probe", "conditioning probe: is an attribute in the conditioning or lost in the UNet"),
    "base-t2i": (
        "base_t2i",
        "the mini text-to-image base and fine-tune: train, finetune, init, check, ship (see its --help)",
    ),
    "base-vlm": ("base_vlm", "the mini VLM base (Idefics2, perceiver in place): train, check, ship"),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in DELEGATED:
        from importlib import import_module

        module = import_module(f".{DELEGATED[argv[0]][0]}", __package__)
        return module.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini", description=first_line(__doc__))
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
    d = sub.add_parser("demo", help="generate the bundled demo prompts with the shipped (or a given) model")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--model", type=Path, default=None, help="a model folder (default: the shipped one)")
    d.add_argument("--samples", type=int, default=4, help="images per prompt (and as many text-only)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=None, help="default: the mini preset's")
    d.add_argument("--guidance", type=float, default=None, help="default: the mini preset's")
    s = sub.add_parser("ship", help="copy a training export into mumu_core/mini/weights with its hashes")
    s.add_argument("--export", type=Path, required=True, help="python -m train's out_dir/export/step_N")
    s.add_argument("--recipe", type=Path, default=None, help="the recipe's summary json (wall time, status)")
    s.add_argument("--command", default="bash scripts/train_mini.sh", help="the command that trained it")
    s.add_argument("--fp32", action="store_true", help="keep float32 (default: float16 files)")
    s.add_argument("--weights", type=Path, default=None, help="destination (default: the package's)")
    s.add_argument(
        "--on-bases",
        nargs=2,
        type=Path,
        metavar=("VLM", "SDXL"),
        default=None,
        help="ship only the bundle, on these (shipped) base folders; the export must hold exactly their tensors",
    )
    sub.add_parser("demo-assets", help="rewrite the bundled demo prompts and references")
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    args = ap.parse_args(argv)

    if args.cmd in ("demo", "ship", "demo-assets"):
        from . import demo as D

        if args.cmd == "demo" and args.samples < 1:
            ap.error(f"--samples must be >= 1, got {args.samples}")
        try:
            if args.cmd == "demo":
                result = D.run_demo(
                    args.out,
                    model=args.model or D.MODEL_DIR,
                    samples=args.samples,
                    seed=args.seed,
                    steps=args.steps,
                    guidance=args.guidance,
                )
                print(f"wrote {len(result.files)} PNGs and summary.txt/.json to {args.out}")
                print("\n".join(result.summary))  # what the sheet shows, in three lines
            elif args.cmd == "ship":
                info: dict = {"command": args.command}
                if args.recipe is not None:
                    info["recipe"] = json.loads(args.recipe.read_text())
                cfg = args.export.parent.parent / "config.json"
                if cfg.is_file():
                    info["train_config"] = json.loads(cfg.read_text())
                bases = (
                    None if args.on_bases is None else dict(zip(("vlm", "sdxl"), args.on_bases, strict=True))
                )
                record = D.ship(
                    args.export, args.weights or D.WEIGHTS_DIR, fp16=not args.fp32, info=info, bases=bases
                )
                print(
                    json.dumps(
                        {k: v for k, v in record.items() if k not in ("train_config", "base_files")}, indent=2
                    )
                )
            else:
                prompts = D.make_demo_assets()
                print(f"wrote {len(prompts)} prompts to {D.DEMO_DIR}")
        except D.MiniModelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

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
