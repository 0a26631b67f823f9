"""Bootstrap throughput: detection images/s vs batch size, and 1 vs 2 Ray workers.

    python bench/bench_bootstrap.py                       # tiny random GroundingDINO, CPU
    python bench/bench_bootstrap.py --detector /models/grounding-dino-tiny --device cuda --images 64

Without ``--detector`` a tiny random GroundingDINO (mumu_core.data.tiny) is built in a temp folder:
numbers then measure the pipeline's overhead (tokenising, preprocessing, post-processing, batching)
more than the network. Prints ratios and writes bench/results/bootstrap.json.
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

from mumu_core.data import BootstrapConfig, FolderSource, GroundingDinoDetector, bootstrap  # noqa: E402
from mumu_core.data.shards import write_json_atomic  # noqa: E402
from mumu_core.data.tiny import build_tiny_grounding_dino  # noqa: E402

CAPTIONS = ["a man and his dog", "a red car near a tree", "a woman with a cat on a bench", "a boy and a ball"]


def synth(i: int, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((w, h), Image.NEAREST)


def bench_detection(
    det: GroundingDinoDetector, n: int, sizes: list[int], w: int, h: int, repeats: int = 3
) -> list[dict]:
    images = [synth(i, w, h) for i in range(n)]
    phrases = [["man", "dog", "red car"]] * n
    det.detect(images[:2], phrases[:2])  # warm-up (allocations, lazy init)
    rows = []
    for bs in sizes:
        sync = torch.cuda.synchronize if det.device.type == "cuda" else (lambda: None)
        times = []
        for _ in range(repeats):  # best of N: the CPU is shared, the minimum is the least disturbed run
            sync()
            t0 = time.perf_counter()
            for s in range(0, n, bs):
                det.detect(images[s : s + bs], phrases[s : s + bs])
            sync()
            times.append(time.perf_counter() - t0)
        dt = min(times)
        rows.append(
            {"batch_size": bs, "images": n, "seconds": round(dt, 4), "images_per_s": round(n / dt, 3)}
        )
        print(f"detect  batch {bs:3d}: {n / dt:8.2f} img/s")
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup_vs_batch_1"] = round(r["images_per_s"] / base, 3)
    return rows


def bench_ray(detector: str, tmp: Path, n: int, parts: int, w: int, h: int, device: str) -> dict:
    import ray

    folder = tmp / "imgs"
    folder.mkdir()
    for i in range(n):
        synth(i, w, h).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    cfg = BootstrapConfig(
        detector_path=detector,
        device=device,
        min_crop_side=8,
        box_threshold=0.0,
        batch_size=4,
        images_per_part=max(1, n // parts),
        controls=("canny", "sketch"),
    )
    out = {}
    for workers in (1, 2):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            man = bootstrap(
                FolderSource(folder, cfg.images_per_part),
                tmp / f"out{workers}",
                cfg,
                "ray",
                num_workers=workers,
                progress=False,
            )
            dt = time.perf_counter() - t0
        finally:
            ray.shutdown()
        assert man["counts"]["images_out"] == n, man["counts"]
        out[f"workers_{workers}"] = {"seconds": round(dt, 3), "images_per_s": round(n / dt, 3)}
        print(f"ray     {workers} worker(s): {n / dt:8.2f} img/s ({dt:.1f} s incl. actor start)")
    out["ratio_2_vs_1_workers"] = round(
        out["workers_2"]["images_per_s"] / out["workers_1"]["images_per_s"], 3
    )
    print(f"ratio 2 vs 1 Ray workers: {out['ratio_2_vs_1_workers']:.2f}x")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", help="local GroundingDINO folder (default: tiny random model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-sizes", default="1,2,4,8")
    ap.add_argument("--size", default="320x240", help="synthetic image WxH")
    ap.add_argument("--ray-images", type=int, default=16)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "bootstrap.json"))
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        detector = args.detector or str(build_tiny_grounding_dino(tmp / "tiny_gdino"))
        det = GroundingDinoDetector.from_pretrained(detector, device=args.device)
        result = {
            "detector": args.detector or "tiny random GroundingDINO (mumu_core.data.tiny)",
            "device": str(det.device),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "image_size": [w, h],
            "load_average_at_start": list(os.getloadavg()),  # a shared CPU makes ratios noisy
            "note": "ray timings include actor start and model load per worker; with few images they "
            "measure start-up more than throughput (use --ray-images for more)",
            "detection": bench_detection(
                det, args.images, [int(b) for b in args.batch_sizes.split(",")], w, h
            ),
        }
        best = max(result["detection"], key=lambda r: r["images_per_s"])
        print(f"best batch {best['batch_size']}: {best['speedup_vs_batch_1']:.2f}x batch 1")
        del det
        if not args.no_ray:
            result["ray_cpu"] = bench_ray(detector, tmp, args.ray_images, 4, w, h, "cpu")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
