"""Registers MUMU's model folders with ComfyUI's folder_paths (also honoured by extra_model_paths.yaml).

ComfyUI reads extra_model_paths.yaml before custom nodes load, so a ``mumu:`` or ``LLM:`` entry there may
already have created the folder kind (with an empty extension set); registration keeps those paths and
adds the default ``models/<kind>/`` after them.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

from .model_folders import (
    BUNDLE_EXTENSIONS,
    DETECTOR_FOLDER,
    MUMU_FOLDER,
    SAM_FOLDER,
    VLM_FOLDER,
    list_hf_folders,
    resolve_bundle,
    resolve_hf_folder,
    resolve_model_folder,
)


def register_folders() -> None:
    for kind in (MUMU_FOLDER, VLM_FOLDER, DETECTOR_FOLDER, SAM_FOLDER):
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))
    # Only bundles in the mumu dropdown. The set is mutated in place because a yaml entry may have
    # created it; an empty set would mean "every file".
    folder_paths.folder_names_and_paths[MUMU_FOLDER][1].update(BUNDLE_EXTENSIONS)


def vlm_roots() -> list[str]:
    return folder_paths.get_folder_paths(VLM_FOLDER)


def bundle_roots() -> list[str]:
    return folder_paths.get_folder_paths(MUMU_FOLDER)


def vlm_choices() -> list[str]:
    return list_hf_folders(vlm_roots())


def bundle_choices() -> list[str]:
    # folder_paths' own listing (cached, extension-filtered), as ComfyUI's loaders use.
    return folder_paths.get_filename_list(MUMU_FOLDER)


def vlm_path(name: str) -> Path:
    return resolve_hf_folder(name, vlm_roots())


def bundle_path(name: str) -> Path:
    return resolve_bundle(name, bundle_roots())


def loras_dir() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0])


def hf_choices(kind: str) -> list[str]:
    """Sub-folders holding a config.json of a registered folder kind (grounding-dino, sams)."""
    return list_hf_folders(folder_paths.get_folder_paths(kind))


def hf_path(kind: str, name: str, what: str) -> Path:
    return resolve_model_folder(name, folder_paths.get_folder_paths(kind), kind, what)
