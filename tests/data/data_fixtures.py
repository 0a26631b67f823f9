"""Helpers for the bootstrap tests: the tiny model folders (mumu_core.data.tiny) and synthetic images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mumu_core.data.tiny import build_tiny_depth, build_tiny_grounding_dino


def synth_image(w: int, h: int, seed: int = 0) -> Image.Image:
    """Coloured rectangles on a gradient: edges for canny/sketch, deterministic per seed."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 2] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def jpeg_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_gdino_folder(folder: Path) -> Path:
    return build_tiny_grounding_dino(folder)


def tiny_depth_folder(folder: Path) -> Path:
    return build_tiny_depth(folder)
