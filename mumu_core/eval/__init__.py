"""Evaluation of MUMU generations: multimodal CLIP score, DreamBench CLIP-I/CLIP-T/DINO, ArcFace
face similarity, and reports. See docs/EVAL.md. Models are imported lazily so that manifests and
plans work without loading any weights."""

from mumu_core.eval.manifest import (
    EvalCase,
    GenerateJob,
    Manifest,
    ManifestError,
    Suite,
    load_manifest,
    load_suite,
    plan_suite,
    save_manifest,
    save_suite,
    write_generate_script,
)
from mumu_core.eval.metrics import METRICS, CaseScores, Evaluator, ImageScores, aggregate

__all__ = [
    "METRICS",
    "CaseScores",
    "EvalCase",
    "GenerateJob",
    "Evaluator",
    "ImageScores",
    "Manifest",
    "ManifestError",
    "Suite",
    "aggregate",
    "load_manifest",
    "load_suite",
    "plan_suite",
    "save_manifest",
    "save_suite",
    "write_generate_script",
]
