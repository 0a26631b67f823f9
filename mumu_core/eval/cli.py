"""``python -m mumu_core.eval``: score a manifest, plan a suite, or write the DreamBench suite.

    python -m mumu_core.eval run --manifest cases.json --out results/ --clip models/clip-vit-large-patch14 \\
        --dino models/dino-vits16 --grounding-dino models/grounding-dino-base --faces models/antelopev2
    python -m mumu_core.eval dreambench-suite --dataset dreambooth/dataset --out suite.json
    python -m mumu_core.eval plan --suite suite.json --out runs/dreambench
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mumu_core.eval.manifest import (
    DEFAULT_SEEDS,
    ManifestError,
    dreambench_suite,
    load_manifest,
    load_suite,
    plan_suite,
    save_manifest,
    save_suite,
    write_generate_script,
)
from mumu_core.eval.metrics import METRICS, EvalInputError
from mumu_core.eval.models import ModelFolderError

from ..cli_help import first_line


class UsageError(ValueError):
    """The command line asks for something it does not give the means for."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mumu_core.eval", description=first_line(__doc__))
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="score the cases of a manifest and write CSV/JSON/HTML/PNG")
    r.add_argument("--manifest", required=True, type=Path)
    r.add_argument(
        "--out", required=True, type=Path, help="folder for results.json, *.csv, report.html, grid.png"
    )
    r.add_argument(
        "--metrics", default=",".join(METRICS), help=f"comma list from {','.join(METRICS)} (default: all)"
    )
    r.add_argument(
        "--clip", type=Path, help="CLIP folder (CLIPModel + processor), for clip_t, clip_i, mm_clip"
    )
    r.add_argument("--dino", type=Path, help="DINO ViT-S/16 folder (facebook/dino-vits16), for dino")
    r.add_argument(
        "--grounding-dino",
        type=Path,
        help="GroundingDINO folder, for mm_clip (and --face-detector grounding)",
    )
    r.add_argument(
        "--faces", type=Path, help="InsightFace antelopev2 folder (glintr100.onnx, scrfd_10g_bnkps.onnx)"
    )
    r.add_argument("--arcface", type=Path, help="ArcFace ONNX file (default: <faces>/glintr100.onnx)")
    r.add_argument("--scrfd", type=Path, help="SCRFD ONNX file (default: <faces>/scrfd_10g_bnkps.onnx)")
    r.add_argument("--face-detector", choices=("scrfd", "grounding"), default="scrfd",
                   help="scrfd: landmark-aligned faces (default); grounding: GroundingDINO 'face' boxes, unaligned")  # fmt: skip
    r.add_argument("--box-threshold", type=float, default=0.35, help="GroundingDINO box score threshold")
    r.add_argument("--text-threshold", type=float, default=0.25, help="GroundingDINO text threshold")
    r.add_argument("--face-threshold", type=float, default=0.5, help="SCRFD face score threshold")
    r.add_argument("--face-det-size", type=int, default=640, help="SCRFD input side (InsightFace: 640)")
    r.add_argument(
        "--device", default="cpu", help="torch device for CLIP, DINO and GroundingDINO (e.g. cuda)"
    )

    s = sub.add_parser(
        "dreambench-suite", help="write the DreamBench suite JSON for a local copy of its dataset"
    )
    s.add_argument("--dataset", required=True, type=Path, help="google/dreambooth's dataset/ folder")
    s.add_argument("--out", required=True, type=Path, help="suite JSON to write")
    s.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    s.add_argument(
        "--reference-index", type=int, default=0, help="which photo of each subject conditions generation"
    )
    s.add_argument("--generate-arg", action="append", default=[], dest="generate_args",
                   help="extra argument passed to every generate command (repeat; e.g. --generate-arg=--steps=30)")  # fmt: skip

    pl = sub.add_parser("plan", help="expand a suite into a manifest and a script of generate commands")
    pl.add_argument("--suite", required=True, type=Path)
    pl.add_argument(
        "--out", required=True, type=Path, help="folder for manifest.json, generate.sh and generated/"
    )
    pl.add_argument("--generate-cmd", default="python -m mumu_core generate")
    pl.add_argument(
        "--generate-arg",
        action="append",
        default=[],
        dest="generate_args",
        help="argument added to every generate command after the suite's (repeat), e.g. --generate-arg=--vlm=models/idefics2-8b",
    )
    pl.add_argument(
        "--overwrite", action="store_true", help="generate.sh regenerates images that already exist"
    )
    return p


def _run(args: argparse.Namespace) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    missing = []
    if {"clip_t", "clip_i", "mm_clip"} & set(metrics) and args.clip is None:
        missing.append("--clip")
    if "dino" in metrics and args.dino is None:
        missing.append("--dino")
    if args.grounding_dino is None and (
        "mm_clip" in metrics or ("face" in metrics and args.face_detector == "grounding")
    ):
        missing.append("--grounding-dino")
    if "face" in metrics and args.faces is None:
        lacking = [f for f, v in (("--arcface", args.arcface), ("--scrfd", args.scrfd)) if v is None]
        if args.face_detector != "scrfd":
            lacking = [f for f in lacking if f != "--scrfd"]
        if lacking:
            missing.append(f"--faces (the antelopev2 folder) or {' and '.join(lacking)}")
    if missing:
        raise UsageError(
            f"metrics {metrics} need {', '.join(dict.fromkeys(missing))}: give those models (docs/EVAL.md "
            "lists what goes in each) or choose fewer metrics with --metrics"
        )
    manifest = load_manifest(args.manifest)  # validated before any model is loaded

    from mumu_core.eval.faces import ArcFaceEmbedder, FaceAnalyzer, GroundingFaceDetector, ScrfdDetector
    from mumu_core.eval.metrics import Evaluator
    from mumu_core.eval.models import ClipScorer, DinoScorer, GroundingDetector
    from mumu_core.eval.report import write_results

    clip = ClipScorer(args.clip, args.device) if {"clip_t", "clip_i", "mm_clip"} & set(metrics) else None
    dino = DinoScorer(args.dino, args.device) if "dino" in metrics else None
    detector = None
    if "mm_clip" in metrics or ("face" in metrics and args.face_detector == "grounding"):
        detector = GroundingDetector(
            args.grounding_dino, args.device, args.box_threshold, args.text_threshold
        )
    faces = None
    if "face" in metrics:
        arcface = args.arcface or args.faces / "glintr100.onnx"
        if args.face_detector == "scrfd":
            det = ScrfdDetector(
                args.scrfd or args.faces / "scrfd_10g_bnkps.onnx",
                input_size=args.face_det_size,
                score_threshold=args.face_threshold,
            )
        else:
            det = GroundingFaceDetector(detector)
        faces = FaceAnalyzer(det, ArcFaceEmbedder(arcface), args.face_detector)
    evaluator = Evaluator(clip, dino, detector if "mm_clip" in metrics else None, faces, metrics)
    results = evaluator.evaluate(manifest)
    info = {
        "manifest": str(args.manifest),
        "metrics": metrics,
        "clip": str(args.clip) if clip else None,
        "dino": str(args.dino) if dino else None,
        "grounding_dino": str(args.grounding_dino) if detector else None,
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
        "face_detector": args.face_detector if faces else None,
        "face_threshold": args.face_threshold if faces else None,
        "face_det_size": args.face_det_size if faces and args.face_detector == "scrfd" else None,
    }
    paths = write_results(results, args.out, info)
    from mumu_core.eval.metrics import aggregate

    agg = aggregate(results)
    for m in metrics:
        v = agg[m]
        print(f"{m:8s} {'n/a' if v is None else f'{v:.4f}'}  (over {agg[m + '_n']} images)")
    if "mm_clip" in metrics:
        print(f"objects found {agg['objects_found']}, missing {agg['objects_missing']}")
    if "face" in metrics:
        print(f"faces found {agg['faces_found']}, missing {agg['faces_missing']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _dreambench(args: argparse.Namespace) -> int:
    suite = dreambench_suite(
        args.dataset,
        seeds=args.seeds,
        reference_index=args.reference_index,
        generate_args=tuple(args.generate_args),
    )
    save_suite(suite, args.out)
    n = sum(len(suite.live_prompts if s.live else suite.object_prompts) for s in suite.subjects)
    print(
        f"wrote {args.out}: {len(suite.subjects)} subjects, {n} cases, {n * len(suite.seeds)} images to generate"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    manifest, jobs = plan_suite(suite, args.out / "generated")
    mpath = save_manifest(manifest, args.out / "manifest.json")
    spath = write_generate_script(
        jobs,
        args.out / "generate.sh",
        args.generate_cmd,
        args.generate_args,
        skip_existing=not args.overwrite,
    )
    print(f"wrote {mpath} ({len(manifest.cases)} cases) and {spath} ({len(jobs)} generate commands)")
    print(
        f"next: bash {spath} && python -m mumu_core.eval run --manifest {mpath} --out {args.out / 'results'} ..."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"run": _run, "dreambench-suite": _dreambench, "plan": _plan}[args.command](args)
    except (UsageError, ManifestError, EvalInputError, ModelFolderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
