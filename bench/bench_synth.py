"""Synthetic-data throughput: SDXL + PickScore images/s per batch size, and 1 vs 2 Ray workers.

    python bench/bench_synth.py                                   # tiny random models, CPU (~2 min)
    python bench/bench_synth.py --sdxl models/sdxl-base --pickscore models/PickScore_v1 \
        --pickscore-processor models/CLIP-ViT-H-14 --device cuda --steps 30 --resolution 1024 --images 32

Without ``--sdxl`` the tiny random model set (mumu_core.testing: SDXL-class UNet/VAE with both CLIP text
encoders, a CLIPModel for PickScore) is built in a temp folder: the numbers then measure the pipeline's
overhead (text encoding, scheduler, VAE decode, JPEG, scoring, shard writing) more than the networks.
Every run goes through ``mumu_core.data.synth.synth`` (the code path of the CLI). Prints ratios and writes
bench/results/synth.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mumu_core.data.prompts import pair, write_table  # noqa: E402
from mumu_core.data.shards import write_json_atomic  # noqa: E402
from mumu_core.data.synth import SynthConfig, SynthModels, synth  # noqa: E402

CONTENTS = ["a man and his dog", "a woman with a cat", "a red car on a bench", "a boy with a ball"]
STYLES = ["oil painting, warm light", "pencil sketch", "pixel art, 16-bit", "watercolor, soft washes"]


def table(path: Path, n: int) -> Path:
    rows = pair(CONTENTS, STYLES, len(STYLES), seed=0)
    while len(rows) < n:
        rows += [{**r, "id": f"p{len(rows) + i:08d}"} for i, r in enumerate(rows)]
    return write_table(rows[:n], path)


def part_rate(out: Path, n: int, workers: int) -> float:
    """Images/s from the parts' own timings (generation + scoring + writing, no actor start)."""
    busy = sum(json.loads(p.read_text())["seconds"] for p in out.glob("shard-*.json"))
    return n / (busy / workers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdxl", help="SDXL folder (default: tiny random set)")
    ap.add_argument("--pickscore", help="PickScore CLIPModel folder (default: tiny random)")
    ap.add_argument("--pickscore-processor")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "synth.json"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    load0 = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        if args.sdxl:
            sdxl, ps, proc, what = args.sdxl, args.pickscore, args.pickscore_processor, f"{args.sdxl}"
        else:
            from mumu_core.testing import build_tiny_models

            tm = build_tiny_models(tmp / "models", "tiny")
            sdxl, ps, proc, what = (
                str(tm.sdxl),
                str(tm.pickscore),
                None,
                "tiny random set (mumu_core.testing)",
            )
        prompts = table(tmp / "p.jsonl", args.images)
        base = dict(sdxl=sdxl, pickscore=ps, pickscore_processor=proc, min_pickscore=-1e9, steps=args.steps,
                    resolution=args.resolution, device=args.device, dtype=args.dtype)  # fmt: skip
        models = SynthModels.load(SynthConfig(**base))
        synth(prompts, tmp / "warm", SynthConfig(**base, prompts_per_shard=2), progress=False, models=models)
        local = []
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            cfg = SynthConfig(**base, batch_size=bs, prompts_per_shard=args.images)
            m = synth(prompts, tmp / f"local{bs}", cfg, progress=False, models=models)
            rate = m["runs"][-1]["images_per_second"]
            local.append({"batch_size": bs, "images": args.images, "images_per_s": rate})
            print(f"local batch {bs:2d}: {rate:8.3f} img/s")
        for r in local:
            r["speedup_vs_first"] = round(r["images_per_s"] / local[0]["images_per_s"], 3)
        ray_rows: dict = {}
        if not args.no_ray:
            import ray

            # One Ray session for both runs: a second start on a loaded machine can time out.
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            for workers in (1, 2):
                cfg = SynthConfig(**base, batch_size=4, prompts_per_shard=max(1, args.images // 4))
                t0 = time.perf_counter()
                try:
                    m = synth(prompts, tmp / f"ray{workers}", cfg, "ray", num_workers=workers, progress=False)
                except BaseException:
                    ray.shutdown()
                    raise
                wall = time.perf_counter() - t0
                assert m["counts"]["generated"] == args.images, m["counts"]
                row = {
                    "seconds_incl_actor_start": round(wall, 3),
                    "images_per_s_incl_start": round(args.images / wall, 3),
                    "images_per_s_parts": round(part_rate(tmp / f"ray{workers}", args.images, workers), 3),
                }
                ray_rows[f"workers_{workers}"] = row
                print(f"ray {workers} worker(s): {row['images_per_s_parts']:8.3f} img/s in parts, "
                      f"{row['images_per_s_incl_start']:.3f} img/s incl. actor start ({wall:.1f} s)")  # fmt: skip
            ray.shutdown()
            for k in ("images_per_s_parts", "images_per_s_incl_start"):
                ray_rows[f"ratio_2_vs_1_{k}"] = round(ray_rows["workers_2"][k] / ray_rows["workers_1"][k], 3)
            print(f"ratio 2 vs 1 Ray workers: {ray_rows['ratio_2_vs_1_images_per_s_parts']:.2f}x (parts), "
                  f"{ray_rows['ratio_2_vs_1_images_per_s_incl_start']:.2f}x (incl. start)")  # fmt: skip
    device = models.generator.pipe.device.type
    result = {
        "models": what,
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "resolution": args.resolution,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load0,
        "load_average_at_end": list(os.getloadavg()),
        "note": "local rates exclude model loading; ray rates 'incl_start' include actor start and model load, "
        "'parts' use the parts' own timings. On a shared 2-core machine (see load averages) two CPU workers "
        "compete for the same cores, so the CPU ratio says little about GPU scale-out (one actor per GPU)",
        "local": local,
        "ray": ray_rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
