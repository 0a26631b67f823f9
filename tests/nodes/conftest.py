"""Fixtures for the tests that need a real ComfyUI (skipped, with the reason, where there is none).

Environment:
- MUMU_COMFYUI_DIR: a ComfyUI checkout (the folder with main.py);
- MUMU_COMFYUI_PYTHON: the python of its venv (torch, torchvision, transformers, diffusers, peft);
- MUMU_TEST_SDXL_CKPT: optional, a random (or real) SDXL-family checkpoint; else the harness's
  make_ckpt.py writes a random Segmind Vega one (1.7 GB) once into MUMU_TEST_CACHE (default
  ~/.cache/comfyui-mumu-tests/, file vega_random_v2.safetensors). Either is refused or remade when its
  GroupNorm scales are zero (a dead UNet, output 0 for every input);
- MUMU_COMFY_HARNESS: the comfy-harness folder (default: ../shared/comfy-harness next to the repo).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ComfyEnv:
    comfy_dir: Path
    python: Path
    harness: Path


@pytest.fixture(scope="session")
def comfy_env() -> ComfyEnv:
    comfy_dir = os.environ.get("MUMU_COMFYUI_DIR")
    python = os.environ.get("MUMU_COMFYUI_PYTHON")
    if not comfy_dir or not python:
        pytest.skip(
            "needs a real ComfyUI: set MUMU_COMFYUI_DIR (checkout) and MUMU_COMFYUI_PYTHON (its venv python)"
        )
    comfy, py = Path(comfy_dir), Path(python)
    if not (comfy / "main.py").is_file():
        pytest.fail(f"MUMU_COMFYUI_DIR={comfy} has no main.py: point it at the ComfyUI folder")
    if not py.is_file():
        pytest.fail(f"MUMU_COMFYUI_PYTHON={py} does not exist")
    harness = Path(os.environ.get("MUMU_COMFY_HARNESS", REPO.parent / "shared" / "comfy-harness"))
    return ComfyEnv(comfy, py, harness)


# Versioned: a file cached by an older harness (zero GroupNorm scales, UNet output exactly 0) is never
# reused under this name; any cached file is also checked and remade if its norm scales are dead.
CHECKPOINT_CACHE = (
    Path(os.environ.get("MUMU_TEST_CACHE", Path.home() / ".cache" / "comfyui-mumu-tests"))
    / "vega_random_v2.safetensors"
)


def make_vega_checkpoint(env: ComfyEnv, path: Path) -> None:
    script = env.harness / "testdata" / "make_ckpt.py"
    if not script.is_file():
        pytest.skip(f"no SDXL checkpoint: set MUMU_TEST_SDXL_CKPT or MUMU_COMFY_HARNESS ({script} missing)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    cmd = [
        str(env.python),
        str(script),
        "--comfy",
        str(env.comfy_dir),
        "--variant",
        "vega",
        "--out",
        str(tmp),
    ]
    subprocess.run(cmd, check=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive lock beside ``path``: pytest-xdist workers (scripts/test.sh runs two) share the
    cache, and only one may make the 1.7 GB checkpoint while the others wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfy_env: ComfyEnv) -> Path:
    from nodes_models import dead_norm_scales

    env = os.environ.get("MUMU_TEST_SDXL_CKPT")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"MUMU_TEST_SDXL_CKPT={path} does not exist")
        dead = dead_norm_scales(path)
        if dead:
            pytest.fail(
                f"MUMU_TEST_SDXL_CKPT={path} has zero or missing norm scales {dead}: its UNet outputs 0 "
                "for every input. Remake it with the current comfy-harness testdata/make_ckpt.py"
            )
        return path
    path = CHECKPOINT_CACHE
    with cache_lock(path):
        if not path.is_file() or dead_norm_scales(path):
            make_vega_checkpoint(comfy_env, path)
            dead = dead_norm_scales(path)
            if dead:
                pytest.fail(
                    f"{path} was just made but its norm scales {dead} are zero: update the comfy-harness"
                )
    return path


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory, sdxl_checkpoint: Path) -> Path:
    from nodes_models import build_comfy_models

    return build_comfy_models(tmp_path_factory.mktemp("comfy_models"), sdxl_checkpoint)
