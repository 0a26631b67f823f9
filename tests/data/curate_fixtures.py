"""Inputs for the curate tests: every kind of bad image, plus ordinary photos (synthetic)."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from data_fixtures import synth_image
from PIL import Image


def encoded(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@functools.cache
def bad_images() -> dict[str, tuple[bytes, str | None]]:
    """name -> (file bytes, the reason curate must give, or None when the image must be kept)."""
    good = encoded(synth_image(320, 240, 1), "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 240x320 -> shown 320x240
    cmyk = Image.new("CMYK", (300, 240), (0, 255, 255, 0))  # red
    grey16 = Image.fromarray(np.full((240, 300), 30000, np.uint16))
    return {
        "zero_byte.jpg": (b"", "empty_file"),
        "text_as.jpg": (b"this is a caption file, not an image\n", "not_an_image"),
        "truncated.jpg": (good[: len(good) // 2], "truncated"),
        "gif_named.jpg": (encoded(synth_image(300, 240, 2), "GIF"), "unsupported_format"),
        "huge.png": (encoded(Image.new("1", (1200, 1000)), "PNG"), "too_many_pixels"),
        "tiny.jpg": (encoded(synth_image(40, 30, 3), "JPEG"), "short_side"),
        "panorama.jpg": (encoded(synth_image(900, 200, 4), "JPEG"), "aspect"),
        "png_named.jpg": (encoded(synth_image(300, 240, 5), "PNG"), None),  # wrong extension, fine image
        "cmyk.jpg": (encoded(cmyk, "JPEG", quality=95), None),
        "grey16.png": (encoded(grey16, "PNG"), None),
        "rotated.jpg": (encoded(synth_image(240, 320, 6), "JPEG", exif=exif), None),
        "good.jpg": (good, None),
    }


# The thresholds the bad-image fixtures are judged with (huge.png is 1.2 MP).
SMALL_RULES = {"min_short_side": 100, "min_megapixels": 0.01, "max_aspect": 2.5, "max_pixels": 1_000_000}


def write_folder(root: Path, items: dict[str, tuple[bytes, str | None]], captions: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, (data, _) in items.items():
        (root / name).write_bytes(data)
        if captions:
            (root / name).with_suffix(".txt").write_text("a man in a red coat")
    return root


def photos(n: int, seed: int = 0) -> dict[str, tuple[bytes, None]]:
    return {
        f"photo{i:03d}.jpg": (encoded(synth_image(160 + 16 * (i % 5), 128, seed + i), "JPEG"), None)
        for i in range(n)
    }
