"""Segment a reference image by a word, as the paper does at test time.

MUMU's paper: "we typically use segmented objects with the background removed because leaving in the
background causes the model to use background details". :class:`ReferenceSegmenter` does that from
local weights only:

1. open-vocabulary detection of the phrase with GroundingDINO (transformers
   ``GroundingDinoForObjectDetection``, the data pipeline's :class:`~mumu_core.data.detect.GroundingDinoDetector`,
   so phrases are grounded exactly as in bootstrapping);
2. a mask from the detected box with SAM (transformers ``SamModel`` + ``SamProcessor``): its three
   candidates restricted to the box, the best by predicted IoU among those not empty there;
3. the reference = the mask's bounding box (plus a margin) cropped out of the image, background black,
   with its mask (255 = keep), which is what ``prompt.prepare_image`` and the Prompt Builder's MASK take.

Nothing found (best box score under ``box_threshold``) or an empty mask raises :class:`SegmentError`
naming the phrase and the score, before anything else is done with the image.

Folders: a Hugging Face GroundingDINO folder (e.g. ``IDEA-Research/grounding-dino-base``) and a SAM
folder (e.g. ``facebook/sam-vit-base``: ``config.json``, ``model.safetensors``,
``preprocessor_config.json``). Tests use :func:`mumu_core.data.tiny.build_tiny_grounding_dino` and
:func:`mumu_core.data.tiny.build_tiny_sam` (random weights, same classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEFAULT_BOX_THRESHOLD = 0.3  # GroundingDINO's usual box threshold (the bootstrapping default too)
DEFAULT_MARGIN = 0.05  # of the crop's side, around the mask's bounding box

SAM_FILES_HINT = (
    "a Hugging Face SAM folder: config.json (model_type 'sam'), model.safetensors and "
    "preprocessor_config.json (e.g. the files of facebook/sam-vit-base, downloaded elsewhere with "
    "`hf download facebook/sam-vit-base --local-dir DIR`)"
)


class SegmentError(ValueError):
    """The phrase was not found in the image, its mask is empty, or a model folder is missing/invalid."""


@dataclass(frozen=True)
class Segmented:
    """A segmented reference: ``image`` RGB with a black background, ``mask`` L (255 = keep), both the
    crop around the subject; ``box`` is that crop in the source image, ``score`` the detector's."""

    image: Image.Image
    mask: Image.Image
    box: tuple[int, int, int, int]
    detector_box: tuple[int, int, int, int]
    score: float
    phrase: str


def check_sam_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SegmentError(f"no SAM model at {folder}: expected {SAM_FILES_HINT}")
    if not any(folder.glob("*.safetensors")):
        raise SegmentError(
            f"{folder} has no *.safetensors weights (pickled .bin files are not loaded): expected {SAM_FILES_HINT}"
        )
    if not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        raise SegmentError(f"{folder} has no preprocessor_config.json: expected {SAM_FILES_HINT}")
    return folder


def check_detector_folder(folder: str | Path) -> Path:
    from .data.detect import _DETECTOR_FILES_HINT

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise SegmentError(
            f"no GroundingDINO model at {folder} (config.json + *.safetensors): expected {_DETECTOR_FILES_HINT}"
        )
    return folder


def clean_phrase(phrase: str) -> str:
    p = " ".join(str(phrase).lower().replace(".", " ").split())
    if not p:
        raise SegmentError("the phrase to segment is empty: give the word for the subject, e.g. 'dog'")
    return p


def _clamp_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    x0, x1 = sorted((int(np.floor(x0)), int(np.ceil(x1))))
    y0, y1 = sorted((int(np.floor(y0)), int(np.ceil(y1))))
    x0, y0 = max(0, min(x0, width - 1)), max(0, min(y0, height - 1))
    x1, y1 = max(x0 + 1, min(x1, width)), max(y0 + 1, min(y1, height))
    return x0, y0, x1, y1


def cut_out(
    image: Image.Image, mask: np.ndarray, margin: float = DEFAULT_MARGIN
) -> tuple[Image.Image, Image.Image, tuple]:
    """Crop ``image`` to ``mask``'s bounding box (+ ``margin`` of its side), background black.

    ``mask``: (H, W) bool of the image's size. Returns (RGB crop, L mask crop 255 = keep, crop box).
    """
    rgb = np.asarray(image.convert("RGB"))
    if mask.shape != rgb.shape[:2]:
        raise SegmentError(f"mask {mask.shape} does not match the image {rgb.shape[:2]}")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise SegmentError("the mask is empty: nothing to cut out")
    h, w = mask.shape
    pad = int(round(margin * max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)))
    box = _clamp_box((xs.min() - pad, ys.min() - pad, xs.max() + 1 + pad, ys.max() + 1 + pad), w, h)
    x0, y0, x1, y1 = box
    m = mask[y0:y1, x0:x1]
    crop = np.where(m[..., None], rgb[y0:y1, x0:x1], 0).astype(np.uint8)
    return Image.fromarray(crop, "RGB"), Image.fromarray((m * 255).astype(np.uint8), "L"), box


class ReferenceSegmenter:
    """GroundingDINO (phrase -> box) then SAM (box -> mask), both from local folders."""

    def __init__(self, detector, sam_model, sam_processor, device: torch.device, dtype: torch.dtype) -> None:
        self.detector = detector
        self.sam = sam_model.to(device=device, dtype=dtype).eval()
        self.sam_processor = sam_processor
        self.device = device
        self.dtype = dtype

    @classmethod
    def from_pretrained(
        cls, detector: str | Path, sam: str | Path, device: str = "cpu", dtype: str = "float32"
    ) -> ReferenceSegmenter:
        from transformers import SamModel, SamProcessor

        from .data.detect import GroundingDinoDetector, resolve_device, resolve_dtype

        check_detector_folder(detector)
        sam = check_sam_folder(sam)
        det = GroundingDinoDetector.from_pretrained(detector, device=device, dtype=dtype)
        model = SamModel.from_pretrained(sam, use_safetensors=True)
        if model.config.model_type != "sam":
            raise SegmentError(
                f"{sam / 'config.json'} is a {model.config.model_type!r} model, expected 'sam'"
            )
        processor = SamProcessor.from_pretrained(sam)
        return cls(det, model, processor, resolve_device(device), resolve_dtype(dtype))

    def find(self, image: Image.Image, phrase: str) -> tuple[tuple[float, float, float, float], float]:
        """The phrase's best box (x0, y0, x1, y1 px) and score."""
        phrase = clean_phrase(phrase)
        got = self.detector.detect([image.convert("RGB")], [[phrase]])[0][0]
        if got is None:
            raise SegmentError(
                f"the detector could not read the phrase {phrase!r} (no token left after truncation)"
            )
        box, score = got
        return tuple(box), float(score)  # type: ignore[return-value]

    @torch.inference_mode()
    def mask_for_box(self, image: Image.Image, box) -> np.ndarray:
        """SAM's best mask (by predicted IoU) inside ``box``, as (H, W) bool of the image's size.

        Candidates with nothing inside the box are passed over (SAM's best-scored one can be a region
        outside it); all-empty gives an empty mask, which :meth:`segment` reports."""
        image = image.convert("RGB")
        inputs = self.sam_processor(images=image, input_boxes=[[list(map(float, box))]], return_tensors="pt")
        out = self.sam(
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
            input_boxes=inputs["input_boxes"].to(self.device, self.dtype),
            multimask_output=True,
        )
        masks = self.sam_processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )[0][0]  # (3, H, W) bool: the candidates for our one box
        x0, y0, x1, y1 = (int(v) for v in box)
        inside = torch.zeros(masks.shape[-2:], dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        masks = masks.bool() & inside
        scores = out.iou_scores[0, 0].float().cpu().clone()
        scores[~masks.flatten(1).any(1)] = -float("inf")
        return masks[int(scores.argmax())].numpy()

    def segment(
        self,
        image: Image.Image,
        phrase: str,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        margin: float = DEFAULT_MARGIN,
    ) -> Segmented:
        """Find ``phrase`` in ``image`` and cut it out (see the module docstring)."""
        if not 0.0 <= box_threshold <= 1.0:
            raise SegmentError(f"box_threshold must be between 0 and 1, got {box_threshold}")
        if not 0.0 <= margin <= 1.0:
            raise SegmentError(f"margin must be between 0 and 1, got {margin}")
        phrase = clean_phrase(phrase)
        image = image.convert("RGB")
        box, score = self.find(image, phrase)
        if score < box_threshold:
            raise SegmentError(
                f"no {phrase!r} found in the image (best detector score {score:.2f} < box threshold "
                f"{box_threshold:.2f}): check the word, lower the threshold, or give a mask yourself"
            )
        dbox = _clamp_box(box, *image.size)
        mask = self.mask_for_box(image, dbox)
        if not mask.any():
            raise SegmentError(
                f"found {phrase!r} at {list(dbox)} (score {score:.2f}) but SAM gave an empty mask there: "
                "try another word or give a mask yourself"
            )
        crop, crop_mask, cbox = cut_out(image, mask, margin)
        return Segmented(crop, crop_mask, cbox, dbox, score, phrase)
