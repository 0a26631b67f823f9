"""Listing and resolving MUMU's model folders (comfy-free; nodes/paths.py feeds it ComfyUI's folders).

* ``mumu`` (``models/mumu/``): bundle files, ``*.safetensors``.
* ``LLM`` (``models/LLM/``): the Idefics2 base in Hugging Face format, one sub-folder per model; the
  dropdown lists every sub-folder (up to :data:`MAX_DEPTH` levels, e.g. ``HuggingFaceM4/idefics2-8b``)
  that holds a ``config.json``. The same folder name is used by other packs for their LLMs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import public_error

MUMU_FOLDER = "mumu"
VLM_FOLDER = "LLM"
DETECTOR_FOLDER = "grounding-dino"  # the folder names other segmentation packs use too
SAM_FOLDER = "sams"
BUNDLE_EXTENSIONS = (".safetensors",)
MAX_DEPTH = 3

BUNDLE_HELP = (
    "a MUMU bundle (.safetensors with the connector and LoRAs, made by `python -m train export` or "
    "mumu_core.bundle.save_bundle)"
)
VLM_HELP = (
    "a Hugging Face Idefics2 folder (config.json, model*.safetensors, tokenizer files, "
    "preprocessor_config.json; e.g. the files of HuggingFaceM4/idefics2-8b)"
)


@public_error
class ModelFileError(FileNotFoundError):
    """A model file or folder is missing; the message names the exact expected path."""


def list_hf_folders(roots: Sequence[str | os.PathLike], max_depth: int = MAX_DEPTH) -> list[str]:
    """Relative names (``/``-separated) of sub-folders of ``roots`` holding a config.json."""
    found: set[str] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            depth = len(rel.parts)
            if depth >= 1 and "config.json" in filenames:
                found.add(rel.as_posix())
                dirnames[:] = []  # a model folder's sub-folders are its own business
                continue
            if depth >= max_depth:
                dirnames[:] = []
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _safe_relative(name: str) -> Path:
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ModelFileError(f"{name!r} is not a name inside a model folder (no absolute paths or '..')")
    return rel


def resolve_hf_folder(name: str, roots: Sequence[str | os.PathLike]) -> Path:
    """The folder ``name`` under the first root that has it with a config.json, or a clear error."""
    rel = _safe_relative(name)
    for root in roots:
        cand = Path(root) / rel
        if (cand / "config.json").is_file():
            return cand
    expected = " or ".join(str(Path(r) / rel) for r in roots) or f"models/{VLM_FOLDER}/{name}"
    raise ModelFileError(
        f"VLM folder {name!r} not found: expected {expected} with config.json. Put {VLM_HELP} there "
        f"(ComfyUI's models/{VLM_FOLDER}/ or an '{VLM_FOLDER}:' entry of extra_model_paths.yaml)."
    )


def resolve_model_folder(name: str, roots: Sequence[str | os.PathLike], kind: str, what: str) -> Path:
    """A Hugging Face folder ``name`` (with config.json) under ``roots`` of folder kind ``kind``."""
    rel = _safe_relative(name)
    for root in roots:
        cand = Path(root) / rel
        if (cand / "config.json").is_file():
            return cand
    expected = " or ".join(str(Path(r) / rel) for r in roots) or f"models/{kind}/{name}"
    raise ModelFileError(
        f"{kind} folder {name!r} not found: expected {expected} with config.json. Put {what} there "
        f"(ComfyUI's models/{kind}/ or a '{kind}:' entry of extra_model_paths.yaml)."
    )


def resolve_bundle(name: str, roots: Sequence[str | os.PathLike]) -> Path:
    rel = _safe_relative(name)
    for root in roots:
        cand = Path(root) / rel
        if cand.is_file():
            return cand
    expected = " or ".join(str(Path(r) / rel) for r in roots) or f"models/{MUMU_FOLDER}/{name}"
    raise ModelFileError(
        f"MUMU bundle {name!r} not found: expected {expected}. Put {BUNDLE_HELP} there "
        f"(ComfyUI's models/{MUMU_FOLDER}/ or a '{MUMU_FOLDER}:' entry of extra_model_paths.yaml)."
    )


def file_identity(*paths: Path) -> str:
    """Paths with size and mtime: changes when a file is replaced, stable otherwise."""
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)
