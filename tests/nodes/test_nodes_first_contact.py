"""Comfy-free checks of the defects a first real-ComfyUI session found (issue 13): mask semantics of
LoadImage's MASK, the conditioning batch against the latent batch, and exception names shown in the UI.
The same behaviours are checked inside a real ComfyUI by comfy_node_check.py.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mumu_core.prompt import PromptError
from nodes import conditioning_format, model_folders
from nodes.conditioning_format import ConditioningFormatError, check_latent_batch
from nodes.errors import PUBLIC_MODULE
from nodes.prompt_spec import build_prompt_spec, looks_inverted


def cutout_png() -> Image.Image:
    """A subject (a disc, touching the bottom edge as a cut-out person does) on a transparent background."""
    im = Image.new("RGBA", (48, 40), (255, 255, 255, 0))
    ImageDraw.Draw(im).ellipse((10, 8, 38, 44), fill=(200, 30, 30, 255))
    return im


def load_image_like_comfyui(im: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """What ComfyUI's LoadImage returns: IMAGE = RGB, MASK = 1 - alpha (1 = transparent)."""
    rgb = torch.from_numpy(np.asarray(im.convert("RGB"), np.float32) / 255)[None]
    alpha = torch.from_numpy(np.asarray(im.getchannel("A"), np.float32) / 255)
    return rgb, (1.0 - alpha)[None]


def spec(image, mask):
    return build_prompt_spec("a <image> on a table", [image, None], [mask, None], ["default"] * 2, [1.0] * 2)


def test_loadimage_mask_of_a_transparent_png_is_refused_and_its_inverse_accepted():
    image, mask = load_image_like_comfyui(cutout_png())
    assert 0 < mask.mean() < 1  # partly transparent: the old all-zero check let it through
    with pytest.raises(PromptError, match="looks like LoadImage's MASK of a transparent PNG.*InvertMask"):
        spec(image, mask)
    kept = spec(image, 1.0 - mask).prompts(16)[0].images[0].mask  # InvertMask's output
    assert np.asarray(kept)[30, 24] == 255 and np.asarray(kept)[0, 0] == 0


def test_keep_masks_of_full_frame_or_centred_subjects_are_not_taken_for_inverted():
    full = np.ones((32, 32))
    centred = np.zeros((32, 32))
    centred[6:26, 8:24] = 1
    bottom = np.zeros((32, 32))
    bottom[10:, 6:26] = 1  # a person cut at the bottom edge
    frame = np.ones((32, 32))
    frame[8:24, 8:24] = 0  # keeps the border, blanks the middle
    assert not looks_inverted(full) and not looks_inverted(centred) and not looks_inverted(bottom)
    assert looks_inverted(frame) and looks_inverted(1 - centred)


def test_a_prompt_batch_needs_a_latent_batch_that_holds_it():
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    check_latent_batch(1, None)
    check_latent_batch(1, latent)
    check_latent_batch(2, {"samples": torch.zeros(4, 4, 8, 8)})  # each prompt twice
    with pytest.raises(ConditioningFormatError, match="makes 3 conditionings.*connect the KSampler's latent"):
        check_latent_batch(3, None)
    with pytest.raises(ConditioningFormatError, match="latent batch is 1 but the prompt makes 3.*drop"):
        check_latent_batch(3, latent)
    with pytest.raises(ConditioningFormatError, match="batch_size to 2"):
        check_latent_batch(2, {"samples": torch.zeros(3, 4, 8, 8)})
    with pytest.raises(ConditioningFormatError, match="LATENT"):
        check_latent_batch(2, {"noise": 1})


def test_exception_types_of_the_pack_have_path_free_names():
    classes = [
        obj
        for mod in (conditioning_format, model_folders)
        for _, obj in inspect.getmembers(mod, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ not in ("builtins",) and "nodes" in mod.__name__
    ]
    ours = [c for c in classes if c.__module__ == PUBLIC_MODULE]
    assert {c.__name__ for c in ours} >= {"ConditioningFormatError", "NotSDXLError", "ModelFileError"}
    # ComfyUI's execution.full_type_name: module + "." + qualname.
    assert f"{ours[0].__module__}.{ours[0].__qualname__}".startswith("ComfyUI-MUMU.")
    for c in classes:
        assert "/" not in c.__module__ and not c.__module__.startswith("nodes"), c
