"""Interleaved text-and-image prompts.

Syntax: ``<image>`` takes the next image in order; ``<imageN>`` (1-based) names image N explicitly.
A prompt uses one style or the other, never both, and every image is used exactly once, so that a
workflow cannot silently drop a reference.

Image preparation follows the paper: RGB, padded to a square with black, resized so that the number
of ViT patches (the number of tokens, since the perceiver resampler is removed) is ``tokens``:
side = patch_size * sqrt(tokens), e.g. 324 tokens -> 252 px and 1296 tokens -> 504 px at patch 14.
An image larger than the side is resized first and padded after, so a panorama never allocates a
square of its longest side; a smaller one is padded, then upsampled.

Colour (``to_rgb_on_black``, docs/ERRORS.md "Images"): every PIL mode becomes RGB with its full range:
16-bit grey (``I;16*``) and ``I`` (read as 16-bit data, 0-65535) are scaled to 8 bits, not clipped;
``F`` (float) is read as 0-1 when all its values lie in [0, 1], else as 0-255 (NaN -> 0); ``1``, ``L``,
``P``, ``CMYK`` (through its ICC profile when it has one), ``YCbCr``, ``LAB``, ``HSV`` convert as PIL
defines; transparency (``RGBA``, ``LA``, ``PA``, ``P`` with transparency, premultiplied ``RGBa``/``La``)
is composited onto black. ``load_image`` also applies the EXIF orientation and takes the first frame of
an animation. Limits: at most ``MAX_INPUT_PIXELS`` (64 Mpx) per image, checked before decoding.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_TOKENS_PER_IMAGE = 324
DEFAULT_PATCH_SIZE = 14
# Idefics2 was trained on images up to 980 px: 4900 patches. Beyond that the position buckets repeat.
MAX_TOKENS_PER_IMAGE = 4900
# A decompression-bomb guard well above any real photo (PIL warns at 89 Mpx).
MAX_INPUT_PIXELS = 8192 * 8192

PLACEHOLDER_RE = re.compile(r"<image(\d*)>")


class PromptError(ValueError):
    """A prompt or one of its images cannot be used; the message says what to change."""


@dataclass(frozen=True)
class ImageRef:
    """One reference image in a prompt.

    ``weight`` scales this image's tokens in the conditioning (1.0 = as trained). ``mask`` (L mode,
    white = keep) blanks the background to black, as the paper's segmented test-time references do.
    """

    image: Image.Image = field(repr=False)
    tokens: int = DEFAULT_TOKENS_PER_IMAGE
    weight: float = 1.0
    mask: Image.Image | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        check_image(self.image)
        if not math.isfinite(self.weight) or self.weight < 0:
            raise PromptError(f"image weight must be a finite number >= 0, got {self.weight}")
        if self.mask is not None and self.mask.size != self.image.size:
            raise PromptError(
                f"mask size {self.mask.size} differs from its image size {self.image.size}: "
                "give a mask of the same width and height as the image"
            )


@dataclass(frozen=True)
class InterleavedPrompt:
    """Text segments and images in prompt order. Empty text segments are never stored."""

    segments: tuple[str | ImageRef, ...]

    def __post_init__(self) -> None:
        if not self.segments or all(isinstance(s, str) and not s.strip() for s in self.segments):
            raise PromptError("the prompt is empty: write some text, optionally with <image> placeholders")
        for s in self.segments:
            if not isinstance(s, (str, ImageRef)):
                raise PromptError(f"a prompt segment must be text or an ImageRef, got {type(s).__name__}")

    @classmethod
    def parse(
        cls,
        text: str,
        images: Sequence[Image.Image] = (),
        tokens_per_image: int | Sequence[int] = DEFAULT_TOKENS_PER_IMAGE,
        weights: Sequence[float] | None = None,
        masks: Sequence[Image.Image | None] | None = None,
    ) -> InterleavedPrompt:
        """Parse ``text`` with ``<image>`` or ``<imageN>`` placeholders against ``images``."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError("the prompt is empty: write some text, optionally with <image> placeholders")
        n = len(images)
        tokens = _per_image(tokens_per_image, n, "tokens_per_image")
        weights = _per_image(1.0 if weights is None else weights, n, "weights")
        masks = _per_image(None if masks is None else masks, n, "masks")

        matches = list(PLACEHOLDER_RE.finditer(text))
        numbered = [m for m in matches if m.group(1)]
        if numbered and len(numbered) != len(matches):
            raise PromptError(
                "the prompt mixes <image> and <imageN> placeholders: use one style, "
                "either all <image> (in order) or all numbered <image1>, <image2>, ..."
            )
        if numbered:
            order = [int(m.group(1)) for m in matches]
            for i in order:
                if not 1 <= i <= n:
                    raise PromptError(
                        f"placeholder <image{i}> names image {i}, but {n} image(s) were given: "
                        f"connect an image for it or use <image1>..<image{n}>"
                    )
            dupes = sorted({i for i in order if order.count(i) > 1})
            if dupes:
                raise PromptError(
                    f"image(s) {dupes} appear more than once in the prompt: use each image once"
                )
            indices = [i - 1 for i in order]
        else:
            if len(matches) > n:
                raise PromptError(
                    f"the prompt has {len(matches)} <image> placeholders but only {n} image(s) were given: "
                    "connect more images or remove placeholders"
                )
            indices = list(range(len(matches)))
        unused = sorted(set(range(n)) - set(indices))
        if unused:
            raise PromptError(
                f"image(s) {[i + 1 for i in unused]} are not used by any placeholder: add "
                f"{'<image>' if not numbered else '<imageN>'} where each image belongs, or disconnect it"
            )

        segments: list[str | ImageRef] = []
        pos = 0
        for m, idx in zip(matches, indices):
            if m.start() > pos:
                segments.append(text[pos : m.start()])
            segments.append(ImageRef(images[idx], tokens[idx], float(weights[idx]), masks[idx]))
            pos = m.end()
        if pos < len(text):
            segments.append(text[pos:])
        return cls(tuple(segments))

    @property
    def images(self) -> tuple[ImageRef, ...]:
        return tuple(s for s in self.segments if isinstance(s, ImageRef))

    @property
    def plain_text(self) -> str:
        """The text with placeholders removed and whitespace collapsed (for CLIP-T and baselines)."""
        return " ".join("".join(s for s in self.segments if isinstance(s, str)).split())

    def without_images(self) -> InterleavedPrompt:
        """The text-only baseline: the same words, no image tokens at all (not black images)."""
        return InterleavedPrompt((self.plain_text,))

    def to_text(self) -> str:
        """The prompt text with numbered placeholders, e.g. for logs and workflow widgets."""
        out, k = [], 0
        for s in self.segments:
            if isinstance(s, str):
                out.append(s)
            else:
                k += 1
                out.append(f"<image{k}>")
        return "".join(out)

    def with_tokens(self, tokens: int) -> InterleavedPrompt:
        """The same prompt with every image at ``tokens`` tokens."""
        return InterleavedPrompt(
            tuple(replace(s, tokens=tokens) if isinstance(s, ImageRef) else s for s in self.segments)
        )


def check_tokens(tokens: int) -> None:
    root = math.isqrt(tokens) if isinstance(tokens, int) and tokens > 0 else 0
    if root < 1 or root * root != tokens or tokens > MAX_TOKENS_PER_IMAGE:
        raise PromptError(
            f"tokens per image must be a square number between 1 and {MAX_TOKENS_PER_IMAGE} "
            f"(e.g. 324 = 18x18 patches, 1296 = 36x36), got {tokens!r}"
        )


def check_image(image: Image.Image) -> None:
    if not isinstance(image, Image.Image):
        raise PromptError(f"expected a PIL image, got {type(image).__name__}")
    w, h = image.size
    if w == 0 or h == 0:
        raise PromptError(f"image has zero size ({w}x{h}): give a non-empty image")
    if w * h > MAX_INPUT_PIXELS:
        raise PromptError(
            f"image is {w}x{h} ({w * h / 1e6:.0f} Mpx), above the {MAX_INPUT_PIXELS / 1e6:.0f} Mpx limit: "
            "downscale it first (it is resized to at most a few hundred pixels anyway)"
        )


def side_for_tokens(tokens: int, patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    """Square side in pixels that yields ``tokens`` ViT patches."""
    check_tokens(tokens)
    return math.isqrt(tokens) * patch_size


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), "L").convert("RGB")


def to_rgb_on_black(image: Image.Image) -> Image.Image:
    """RGB of any PIL mode at its full range, transparency composited onto black (module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        # PIL's own convert clips these at 255 (a 16-bit photo turns white); scale 0-65535 to 0-255.
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        unit = values.size and values.min() >= 0.0 and values.max() <= 1.0
        return _grey_to_rgb(values * 255.0 if unit else values)
    if mode in ("RGBa", "La"):  # premultiplied: over black, the colour channels are the result
        bands = image.split()
        return Image.merge("RGB", bands[:3]) if mode == "RGBa" else bands[0].convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    if mode == "CMYK" and image.info.get("icc_profile"):
        import io

        from PIL import ImageCms

        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
            return ImageCms.profileToProfile(image, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken embedded profile: PIL's plain conversion below, as without one
    return image.convert("RGB")


def prepare_image(
    image: Image.Image,
    tokens: int = DEFAULT_TOKENS_PER_IMAGE,
    mask: Image.Image | None = None,
    patch_size: int = DEFAULT_PATCH_SIZE,
) -> Image.Image:
    """RGB, background masked to black, black square pad (centred), resize to the token side."""
    check_image(image)
    side = side_for_tokens(tokens, patch_size)
    rgb = to_rgb_on_black(image)
    if mask is not None:
        if mask.size != rgb.size:
            raise PromptError(f"mask size {mask.size} differs from its image size {rgb.size}")
        rgb = Image.composite(rgb, Image.new("RGB", rgb.size), mask.convert("L"))
    w, h = rgb.size
    square = max(w, h)
    if square > side:
        # Downscale first, pad after: never a square canvas of the longest side (a 20000 x 2000
        # panorama would need 1.2 GB as a square).
        nw, nh = max(1, round(w * side / square)), max(1, round(h * side / square))
        small = rgb.resize((nw, nh), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (side, side))
        canvas.paste(small, ((side - nw) // 2, (side - nh) // 2))
        return canvas
    canvas = Image.new("RGB", (square, square))
    canvas.paste(rgb, ((square - w) // 2, (square - h) // 2))
    if square == side:
        return canvas
    return canvas.resize((side, side), Image.Resampling.BICUBIC)


def load_image(path: str | Path) -> Image.Image:
    """Open a reference image fully (so a truncated file fails here, with its path)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"reference image {path} does not exist: check the path")
    try:
        with Image.open(path) as im:
            w, h = im.size  # from the header: a huge image is refused before it is decoded
            if w * h > MAX_INPUT_PIXELS:
                raise PromptError(
                    f"reference image {path} is {w}x{h} ({w * h / 1e6:.0f} Mpx), above the "
                    f"{MAX_INPUT_PIXELS / 1e6:.0f} Mpx limit: downscale it first"
                )
            im.load()
            return ImageOps.exif_transpose(im)  # a copy, upright as the camera meant it
    except PromptError:
        raise
    except Image.DecompressionBombError as e:
        raise PromptError(
            f"reference image {path} is too large to decode safely ({e}): downscale it first"
        ) from e
    except Exception as e:  # PIL raises several types for corrupt files
        raise PromptError(f"reference image {path} cannot be read ({e}): is it a valid PNG/JPEG/WebP?") from e


def _per_image(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise PromptError(f"{name} has {len(values)} entries for {n} image(s): give one per image")
    return values
