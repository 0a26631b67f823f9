"""Control images for training stage 1, computed once at bootstrap time.

- ``canny``: OpenCV Canny edges on the grey image (white edges on black), no model.
- ``sketch``: XDoG (eXtended Difference of Gaussians, Winnemoeller et al. 2012), no model: a soft
  line drawing, white lines on black like ControlNet's soft-edge inputs. The sigma scales with
  the image's short side so a thumbnail and a 1024 px photo give similar strokes.
- ``depth``: any transformers depth-estimation model from a local folder
  (``AutoModelForDepthEstimation``: DPT, Depth Anything, ...). The prediction is resized to the
  image and min-max normalised per image to 0..255; these models predict relative inverse depth,
  so near is bright, which is what depth ControlNets expect.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from .detect import resolve_device, resolve_dtype

_DEPTH_FILES_HINT = (
    "a Hugging Face depth-estimation folder: config.json, model.safetensors and preprocessor_config.json "
    "(e.g. depth-anything/Depth-Anything-V2-Small-hf or Intel/dpt-hybrid-midas, downloaded elsewhere "
    "with `hf download <repo> --local-dir DIR`)"
)


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    grey = np.asarray(image.convert("L"))
    return Image.fromarray(cv2.Canny(grey, low, high))


def xdog_sketch(
    image: Image.Image,
    sigma: float = 0.8,
    k: float = 1.6,
    tau: float = 0.98,
    eps: float = 0.0,
    phi: float = 100.0,
) -> Image.Image:
    """XDoG soft edges: D = G(s) - tau*G(k*s); lines where D < eps, softened by tanh(phi * ...)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    s = sigma * max(min(grey.shape) / 512.0, 0.25)
    g1 = cv2.GaussianBlur(grey, (0, 0), s)
    g2 = cv2.GaussianBlur(grey, (0, 0), s * k)
    d = g1 - tau * g2
    paper = np.where(d >= eps, 1.0, 1.0 + np.tanh(phi * (d - eps)))  # 1 = paper, 0 = ink
    lines = np.clip(1.0 - paper, 0.0, 1.0)
    return Image.fromarray((lines * 255.0 + 0.5).astype(np.uint8))


class DepthEstimator:
    """Batched monocular depth from a local transformers folder."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str = "auto", dtype: str = "float32"
    ) -> DepthEstimator:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no depth model at {folder}: expected {_DEPTH_FILES_HINT}")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{folder} has no *.safetensors weights (pickled .bin files are not loaded): "
                f"expected {_DEPTH_FILES_HINT}"
            )
        model = AutoModelForDepthEstimation.from_pretrained(folder, use_safetensors=True)
        processor = AutoImageProcessor.from_pretrained(folder)
        return cls(model, processor, resolve_device(device), resolve_dtype(dtype))

    @torch.inference_mode()
    def estimate(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """Depth maps (mode L, same size as each input).

        Depth processors keep the aspect ratio, so images are preprocessed one by one and batched
        per resulting tensor shape: uniform datasets get full batches, mixed ones stay correct.
        """
        groups: dict[tuple, list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, im in enumerate(images):
            pv = self.processor(im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
            groups[tuple(pv.shape)].append((i, pv))
        out: list[Image.Image | None] = [None] * len(images)
        for members in groups.values():
            x = torch.stack([pv for _, pv in members]).to(self.device, self.dtype)
            pred = self.model(pixel_values=x).predicted_depth.float()
            if pred.ndim == 3:
                pred = pred[:, None]
            for (i, _), d in zip(members, pred, strict=True):
                w, h = images[i].size
                d = torch.nn.functional.interpolate(
                    d[None], size=(h, w), mode="bicubic", align_corners=False
                )[0, 0]
                lo, hi = d.min(), d.max()
                d = (d - lo) / (hi - lo) if hi > lo else torch.zeros_like(d)
                out[i] = Image.fromarray((d.clamp(0, 1) * 255 + 0.5).byte().cpu().numpy())
        return out  # type: ignore[return-value]
