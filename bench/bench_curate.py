"""Curate throughput: images/s of the whole command at two batch sizes, and where the time goes per stage.

    python bench/bench_curate.py                      # tiny random models (mumu_core.data.curate_tiny), CPU
    python bench/bench_curate.py --models DIR --device cuda --images 256 --size 1024

``--models DIR`` is a folder with sfw/, watermark/, people/ and llava/ model folders (the layout
``build_tiny_curate_models`` writes; real folders can be symlinked there). With the tiny random models
the numbers measure the pipeline (decode, resize, processors, batching, shard writing) more than the
networks. Prints ratios and writes bench/results/curate.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mumu_core.data import FolderSource  # noqa: E402
from mumu_core.data.curate import CurateConfig, CurateModels, cheap_stage, curate, read_rows  # noqa: E402
from mumu_core.data.curate_tiny import build_tiny_curate_models  # noqa: E402
from mumu_core.data.filters import decode_photo  # noqa: E402
from mumu_core.data.shards import write_json_atomic  # noqa: E402


def photo(i: int, side: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (side // 16, side * 4 // 3 // 16, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((side * 4 // 3, side), Image.BILINEAR)


def filter_report(tmp: Path, base: dict, models: CurateModels) -> dict:
    """What each filter removes on the tests' data (tests/data/curate_fixtures.py: every kind of bad
    image + 16 photos), thresholds half-way between measured scores as in tests/data/test_curate.py."""
    sys.path.insert(0, str(REPO / "tests" / "data"))
    from curate_fixtures import SMALL_RULES, bad_images, photos, write_folder

    items = {**bad_images(), **photos(16)}
    folder = write_folder(tmp / "report-in", items)
    good = [decode_photo(d) for d, _ in photos(16).values()]
    nsfw, wm = sorted(models.sfw.score(good)), sorted(models.watermark.score(good))
    scores = sorted({s for f in models.people.detect(good, 0.0) for s in f.scores})
    thresholds = {
        "max_nsfw": (nsfw[-1] + nsfw[-2]) / 2,
        "max_watermark": (wm[-1] + wm[-2]) / 2,
        "people_threshold": (scores[len(scores) // 2] + scores[len(scores) // 2 - 1]) / 2,
    }
    cfg = CurateConfig(**{**base, **SMALL_RULES, **thresholds})
    src = FolderSource(folder, images_per_part=64, captions_required=False)
    man = curate(src, tmp / "report-out", cfg, progress=False, models=models, sheet=False)
    reasons = {k: v for k, v in man["reasons"].items() if v}
    print(
        f"filter report on the test data ({man['counts']['images_in']} images): {reasons}, kept {man['counts']['kept']}"
    )
    return {
        "images_in": man["counts"]["images_in"],
        "kept": man["counts"]["kept"],
        "removed_by_reason": reasons,
        "thresholds": {
            k: round(getattr(cfg, k), 4) for k in ("max_nsfw", "max_watermark", "people_threshold")
        },
        "rules": SMALL_RULES,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="folder with sfw/ watermark/ people/ llava/ (default: tiny random)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=384, help="shorter side of the synthetic photos")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--caption-tokens", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "curate.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models_dir = Path(args.models) if args.models else tmp / "models"
        if not args.models:
            build_tiny_curate_models(models_dir)
        photos = tmp / "photos"
        photos.mkdir()
        for i in range(args.images):
            photo(i, args.size).save(photos / f"p{i:04d}.jpg", quality=90)
        base = dict(
            sfw_model=str(models_dir / "sfw"),
            watermark_model=str(models_dir / "watermark"),
            people_model=str(models_dir / "people"),
            caption_model=str(models_dir / "llava"),
            # Keep every image (thresholds off) so each stage sees all of them.
            max_nsfw=1.0,
            max_watermark=1.0,
            people_threshold=1.0,
            min_short_side=64,
            min_megapixels=0.0,
            caption_max_tokens=args.caption_tokens,
            device=args.device,
        )
        src = FolderSource(photos, images_per_part=args.images, captions_required=False)
        models = CurateModels.load(CurateConfig(**base).validate())
        runs = {}
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            cfg = CurateConfig(**base, batch_size=bs)
            t0 = time.perf_counter()
            man = curate(src, tmp / f"out-{bs}", cfg, progress=False, models=models, sheet=False)
            dt = time.perf_counter() - t0
            assert man["counts"]["kept"] == args.images, man["reasons"]
            runs[bs] = {"seconds": round(dt, 3), "images_per_second": round(args.images / dt, 3)}
            print(f"batch {bs}: {args.images / dt:.2f} images/s ({dt:.1f} s for {args.images})")

        # Where the time goes (batch = the largest size): CPU stage, then each model on the same images.
        bs = max(runs)
        rows = [r for r in read_rows(src, 0) if not r["end"]]
        t0 = time.perf_counter()
        cheap_stage(rows, CurateConfig(**base, batch_size=bs))
        stages = {"decode_and_resolution": time.perf_counter() - t0}
        images = [decode_photo(r["image"]) for r in rows]
        for name, fn in (
            ("sfw", lambda b: models.sfw.score(b)),
            ("watermark", lambda b: models.watermark.score(b)),
            ("people", lambda b: models.people.detect(b)),
            ("caption", lambda b: models.captioner.caption(b)),
        ):
            t0 = time.perf_counter()
            for s in range(0, len(images), bs):
                fn(images[s : s + bs])
            stages[name] = time.perf_counter() - t0
        total = sum(stages.values())
        for k, v in stages.items():
            print(f"  {k:24s} {v:7.2f} s  {v / total:5.1%}")
        ratio = runs[max(runs)]["images_per_second"] / runs[min(runs)]["images_per_second"]
        print(f"batch {max(runs)} / batch {min(runs)}: {ratio:.2f}x")
        report = filter_report(tmp, base, models) if not args.models else None
    result = {
        "what": "python -m mumu_core.data curate throughput (local executor, all filters + LLaVA captions)",
        "models": args.models or "tiny random (mumu_core.data.curate_tiny)",
        "device": args.device,
        "images": args.images,
        "photo_size": [args.size * 4 // 3, args.size],
        "caption_tokens": args.caption_tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
        "runs_by_batch_size": runs,
        "batch_speedup": round(ratio, 3),
        "stage_seconds": {k: round(v, 3) for k, v in stages.items()},
        "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
        "filter_report_on_test_data": report,
        "note": "the machine was shared with other jobs (load > 2 per core): absolute numbers are pessimistic",
    }
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
