"""What the Interleaved Prompt Builder's inputs mean (comfy-free).

Inputs: a text with ``<image>`` / ``<imageN>`` placeholders (mumu_core.prompt's syntax), and up to
:data:`MAX_IMAGES` slots, each an optional IMAGE, an optional MASK, a token count and a weight.

Batching rule (one image batch on one input): an IMAGE input carrying a batch of B images makes B
prompts, one per image, identical except for that image. Inputs with a batch of 1 are shared by
every prompt; inputs with more than one image must all have the same batch size B. The MUMU
encoder then returns CONDITIONING with batch B (use an Empty Latent Image with batch_size B). A MASK
input follows its image: batch 1 (shared) or the image's batch.

Masks follow segmentation nodes: 1 (white) = keep, 0 = background, blanked to black as the paper's
segmented test-time references are. ComfyUI's LoadImage MASK output is the opposite (1 = transparent)
and is a blank 64x64 placeholder for images without alpha; both are refused with a message (a mask that
keeps the border and blanks the centre is taken for LoadImage's: :func:`looks_inverted`).

Slots are numbered by input: ``image1`` is ``<image1>``. Connect them from ``image1`` upwards; a gap
(image3 connected, image2 not) is an error rather than a silent renumbering.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mumu_core.prompt import (
    DEFAULT_TOKENS_PER_IMAGE,
    MAX_TOKENS_PER_IMAGE,
    InterleavedPrompt,
    PromptError,
    check_tokens,
)

MAX_IMAGES = 4
DEFAULT_TOKENS = "default"
# Square token counts only (the image becomes a k x k grid of ViT patches).
TOKEN_CHOICES = [DEFAULT_TOKENS] + [str(k * k) for k in range(1, math.isqrt(MAX_TOKENS_PER_IMAGE) + 1)]


@dataclass(frozen=True)
class Slot:
    """One reference input: ``images`` (B_i, H, W, 3) uint8, ``masks`` (B_m, H, W) uint8 255 = keep."""

    images: np.ndarray
    masks: np.ndarray | None
    tokens: int | None  # None: the bundle's default
    weight: float

    @property
    def batch(self) -> int:
        return self.images.shape[0]

    def image(self, b: int) -> Image.Image:
        return Image.fromarray(self.images[b if self.batch > 1 else 0], "RGB")

    def mask(self, b: int) -> Image.Image | None:
        if self.masks is None:
            return None
        return Image.fromarray(self.masks[b if self.masks.shape[0] > 1 else 0], "L")


@dataclass(frozen=True)
class PromptSpec:
    """The MUMU_PROMPT value passed from the Prompt Builder to the Encoder."""

    text: str
    slots: tuple[Slot, ...]

    @property
    def batch(self) -> int:
        return max((s.batch for s in self.slots), default=1)

    def prompts(self, default_tokens: int) -> list[InterleavedPrompt]:
        """One InterleavedPrompt per batch element; ``default_tokens`` fills slots set to "default"."""
        check_tokens(default_tokens)
        out = []
        for b in range(self.batch):
            out.append(
                InterleavedPrompt.parse(
                    self.text,
                    images=[s.image(b) for s in self.slots],
                    tokens_per_image=[default_tokens if s.tokens is None else s.tokens for s in self.slots],
                    weights=[s.weight for s in self.slots],
                    masks=[s.mask(b) for s in self.slots],
                )
            )
        return out

    def digest(self) -> str:
        """Content hash of text, pixels, masks, tokens and weights (what the encoding depends on)."""
        h = hashlib.sha256()
        h.update(self.text.encode())
        for s in self.slots:
            h.update(repr((s.images.shape, s.tokens, float(s.weight))).encode())
            h.update(s.images.tobytes())
            if s.masks is not None:
                h.update(repr(s.masks.shape).encode())
                h.update(s.masks.tobytes())
        return h.hexdigest()


def parse_tokens(choice: str | int) -> int | None:
    if choice == DEFAULT_TOKENS:
        return None
    try:
        tokens = int(choice)
    except (TypeError, ValueError):
        raise PromptError(f"tokens must be 'default' or a square number like 324, got {choice!r}") from None
    check_tokens(tokens)
    return tokens


def image_to_uint8(image: torch.Tensor, name: str) -> np.ndarray:
    """ComfyUI IMAGE (B, H, W, C) float 0..1 -> (B, H, W, 3) uint8 (extra channels dropped)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 or image.shape[0] < 1:
        raise PromptError(
            f"{name} must be a ComfyUI IMAGE tensor (batch, height, width, channels>=3), "
            f"got {getattr(image, 'shape', type(image).__name__)}"
        )
    x = image[..., :3].detach().float().clamp(0, 1).cpu().numpy()
    return np.round(x * 255).astype(np.uint8)


def mask_to_uint8(mask: torch.Tensor, images: np.ndarray, name: str) -> np.ndarray:
    """ComfyUI MASK (B, H, W) or (H, W), 1 = keep -> (B, H, W) uint8, checked against its image."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise PromptError(f"{name} must be a ComfyUI MASK tensor (batch, height, width)")
    if mask.ndim == 2:
        mask = mask[None]
    b, h, w = mask.shape
    ib, ih, iw = images.shape[:3]
    if (h, w) != (ih, iw):
        hint = (
            " It looks like LoadImage's MASK of an image without transparency, which is an empty 64x64 "
            "placeholder: disconnect it."
            if (h, w) == (64, 64)
            else " Resize the mask to the image (or make it from this image)."
        )
        raise PromptError(f"{name} is {w}x{h} but its image is {iw}x{ih}.{hint}")
    if b not in (1, ib):
        raise PromptError(f"{name} has a batch of {b} but its image has {ib}: give 1 mask or one per image")
    m = mask.detach().float().clamp(0, 1).cpu().numpy()
    for i in range(b):
        if not m[i].any():
            raise PromptError(
                f"{name} (batch item {i}) is all zero, which would blank the whole image. Masks here use "
                "1 = keep the subject; LoadImage's MASK is 1 = transparent, so put an InvertMask after it, "
                "or disconnect the mask."
            )
        if looks_inverted(m[i]):
            raise PromptError(
                f"{name} (batch item {i}) keeps the image's border and blanks its middle: it looks like "
                "LoadImage's MASK of a transparent PNG, which is 1 = transparent (the background). Masks here "
                "use 1 = keep the subject: put an InvertMask after LoadImage's mask."
            )
    return np.round(m * 255).astype(np.uint8)


def looks_inverted(mask: np.ndarray) -> bool:
    """True for a (H, W) 0..1 mask that keeps the border and blanks the centre: a background mask.

    LoadImage's MASK of a partly transparent PNG (a cut-out subject) is 1 on the transparent background,
    which touches the border, and 0 on the subject in the middle. A keep-the-subject mask is the
    opposite: its centre keeps at least as much as its border. Full-frame subjects (both ~1) pass.
    """
    h, w = mask.shape
    if h < 4 or w < 4:
        return False
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    centre = mask[h // 4 : h - h // 4, w // 4 : w - w // 4]
    return float(border.mean()) > 0.5 and float(border.mean()) - float(centre.mean()) > 0.25


def build_prompt_spec(
    text: str,
    images: Sequence[torch.Tensor | None],
    masks: Sequence[torch.Tensor | None],
    tokens: Sequence[str | int],
    weights: Sequence[float],
) -> PromptSpec:
    """Validate the Prompt Builder's inputs (placeholders included) and pack them into a PromptSpec."""
    n = len(images)
    if not (len(masks) == len(tokens) == len(weights) == n):
        raise ValueError("images, masks, tokens and weights need one entry per slot")
    connected = [i for i, im in enumerate(images) if im is not None]
    count = len(connected)
    if connected != list(range(count)):
        first_gap = next(i for i in range(n) if images[i] is None)
        raise PromptError(
            f"image{first_gap + 1} is not connected but image{connected[-1] + 1} is: connect reference "
            f"images from image1 upwards (image N is <imageN> in the prompt)"
        )
    for i in range(count, n):
        if masks[i] is not None:
            raise PromptError(f"mask{i + 1} is connected but image{i + 1} is not: connect its image")
    slots = []
    for i in range(count):
        arr = image_to_uint8(images[i], f"image{i + 1}")  # type: ignore[arg-type]
        m = None if masks[i] is None else mask_to_uint8(masks[i], arr, f"mask{i + 1}")  # type: ignore[arg-type]
        w = float(weights[i])
        if not math.isfinite(w) or w < 0:
            raise PromptError(f"weight{i + 1} must be a finite number >= 0, got {weights[i]}")
        slots.append(Slot(arr, m, parse_tokens(tokens[i]), w))
    batches = sorted({s.batch for s in slots if s.batch > 1})
    if len(batches) > 1:
        sizes = ", ".join(f"image{i + 1}: {s.batch}" for i, s in enumerate(slots))
        raise PromptError(
            f"image inputs have different batch sizes ({sizes}): inputs with more than one image make one "
            "prompt per image and must all have the same batch size (or a batch of 1, shared)"
        )
    spec = PromptSpec(text, tuple(slots))
    # Validate placeholders now, so the error shows on the Prompt Builder rather than the encoder.
    # The token count does not affect placeholder checks; stand in the paper's default where unset.
    InterleavedPrompt.parse(
        text,
        images=[s.image(0) for s in slots],
        tokens_per_image=[DEFAULT_TOKENS_PER_IMAGE if s.tokens is None else s.tokens for s in slots],
        weights=[s.weight for s in slots],
        masks=[s.mask(0) for s in slots],
    )
    return spec


def describe(spec: PromptSpec) -> str:
    """A one-line summary for the UI and logs."""
    parts = []
    for i, s in enumerate(spec.slots):
        t = "default" if s.tokens is None else str(s.tokens)
        parts.append(
            f"image{i + 1}: {s.batch}x{s.images.shape[2]}x{s.images.shape[1]}, tokens {t}, w {s.weight:g}"
        )
    return f"{spec.batch} prompt(s): {spec.text!r}" + ("; " + "; ".join(parts) if parts else "")


__all__ = [
    "MAX_IMAGES",
    "TOKEN_CHOICES",
    "DEFAULT_TOKENS",
    "PromptSpec",
    "Slot",
    "build_prompt_spec",
    "describe",
    "parse_tokens",
]
