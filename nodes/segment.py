"""MUMU Segment Reference: cut the subject named by a word out of a reference (GroundingDINO + SAM).

Glue over ``mumu_core.segment.ReferenceSegmenter``. Outputs the cropped, background-removed reference and
its MASK (1 = keep), ready for the Prompt Builder's image/mask inputs: the paper segments its test-time
references so the model does not copy their backgrounds.
"""

from __future__ import annotations

import logging

import comfy.model_management as mm
import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

from mumu_core.segment import DEFAULT_BOX_THRESHOLD, DEFAULT_MARGIN, SAM_FILES_HINT, ReferenceSegmenter

from . import paths
from .model_folders import DETECTOR_FOLDER, SAM_FOLDER, ModelFileError, file_identity
from .types import CATEGORY

log = logging.getLogger("ComfyUI-MUMU")

DETECTOR_HELP = (
    "a Hugging Face GroundingDINO folder (config.json, model.safetensors, preprocessor_config.json, "
    "tokenizer files; e.g. the files of IDEA-Research/grounding-dino-base)"
)
_CACHE: dict[str, ReferenceSegmenter] = {}  # one loaded pair; ComfyUI re-executes this node per image change


def load_segmenter(detector: str, sam: str) -> ReferenceSegmenter:
    det_dir = paths.hf_path(DETECTOR_FOLDER, detector, DETECTOR_HELP)
    sam_dir = paths.hf_path(SAM_FOLDER, sam, SAM_FILES_HINT)
    files = [p for d in (det_dir, sam_dir) for p in sorted(d.glob("*.safetensors")) + [d / "config.json"]]
    key = file_identity(*files)
    if key not in _CACHE:
        _CACHE.clear()
        device = mm.text_encoder_device()
        _CACHE[key] = ReferenceSegmenter.from_pretrained(det_dir, sam_dir, device=str(device))
        log.info("MUMU: loaded segmenter %s + %s on %s", detector, sam, device)
    return _CACHE[key]


def pad_to(arrays: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Centre each (h_i, w_i, ...) array on a zero (black / background) canvas of (h, w, ...)."""
    out = np.zeros((len(arrays), h, w, *arrays[0].shape[2:]), arrays[0].dtype)
    for i, a in enumerate(arrays):
        y, x = (h - a.shape[0]) // 2, (w - a.shape[1]) // 2
        out[i, y : y + a.shape[0], x : x + a.shape[1]] = a
    return out


class MumuSegmentReference(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMUSegmentReference",
            display_name="MUMU Segment Reference (by word)",
            category=CATEGORY,
            description=(
                "Finds the subject named by `phrase` (GroundingDINO from models/grounding-dino/), masks it "
                "(SAM from models/sams/) and returns it cropped with the background removed, plus its MASK "
                "(1 = keep) for the Prompt Builder, as the paper segments its references at test time. "
                "Fails with the detector's score when the phrase is not found."
            ),
            inputs=[
                io.Image.Input("image"),
                io.String.Input("phrase", default="person", tooltip="The word for the subject, e.g. 'dog'."),
                io.Combo.Input(
                    "detector",
                    options=paths.hf_choices(DETECTOR_FOLDER),
                    tooltip="GroundingDINO folder under models/grounding-dino/ (a sub-folder with config.json).",
                ),
                io.Combo.Input(
                    "sam",
                    options=paths.hf_choices(SAM_FOLDER),
                    tooltip="SAM folder under models/sams/ (transformers format: config.json, model.safetensors).",
                ),
                io.Float.Input(
                    "box_threshold",
                    default=DEFAULT_BOX_THRESHOLD,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Minimum detector score; below it the node fails rather than guess.",
                ),
                io.Float.Input(
                    "margin",
                    default=DEFAULT_MARGIN,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Crop margin around the mask.",
                ),
            ],
            outputs=[io.Image.Output(display_name="reference"), io.Mask.Output(display_name="mask")],
        )

    @classmethod
    def validate_inputs(cls, detector: str) -> bool | str:
        # Only detector: ComfyUI reports a failed validate_inputs against every input it takes, so taking
        # sam too would flag a good SAM folder whenever the detector is missing (the loader's rule). The
        # sam folder keeps ComfyUI's dropdown check, and execute() names its expected path.
        try:
            paths.hf_path(DETECTOR_FOLDER, detector, DETECTOR_HELP)
        except ModelFileError as e:
            return str(e)
        return True

    @classmethod
    def execute(
        cls,
        image: torch.Tensor,
        phrase: str,
        detector: str,
        sam: str,
        box_threshold: float = DEFAULT_BOX_THRESHOLD,
        margin: float = DEFAULT_MARGIN,
    ) -> io.NodeOutput:
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
            raise ValueError(
                f"image must be a ComfyUI IMAGE (batch, height, width, 3), got {getattr(image, 'shape', image)}"
            )
        segmenter = load_segmenter(detector, sam)
        crops, masks = [], []
        pixels = np.round(image[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
        for b in range(pixels.shape[0]):
            mm.throw_exception_if_processing_interrupted()
            s = segmenter.segment(Image.fromarray(pixels[b], "RGB"), phrase, box_threshold, margin)
            log.info("MUMU: segmented %r at %s (score %.2f)", s.phrase, list(s.box), s.score)
            crops.append(np.asarray(s.image, np.float32) / 255.0)
            masks.append(np.asarray(s.mask, np.float32) / 255.0)
        # A batch of different crop sizes is centred on a common black canvas (mask 0 = background there).
        h, w = max(c.shape[0] for c in crops), max(c.shape[1] for c in crops)
        return io.NodeOutput(torch.from_numpy(pad_to(crops, h, w)), torch.from_numpy(pad_to(masks, h, w)))
