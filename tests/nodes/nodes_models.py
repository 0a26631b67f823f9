"""Models for running the pack inside a real ComfyUI on the CPU (pytest-free, so scripts can use it too).

``build_comfy_models(root)`` writes a ComfyUI models tree:

- ``LLM/idefics2-8b/``: a tiny random Idefics2 (mumu_core.presets' TINY VLM), named like the real folder so
  that the bundled workflows' widget values resolve;
- ``mumu/mumu-sdxl.safetensors``: a bundle whose connector outputs SDXL's 2048-d context and 1280-d
  pooled vector (TINY's connector widened via dataclasses.replace), with a random VLM LoRA and a random
  UNet LoRA made on a diffusers ``UNet2DConditionModel`` with Segmind Vega's layout, so every LoRA key
  exists in the random Vega checkpoint ComfyUI detects as SDXL-family;
- ``grounding-dino/grounding-dino-base/``, ``sams/sam-vit-base/``: tiny random GroundingDINO and SAM for
  the MUMU Segment Reference node;
- ``checkpoints/<name>``: symlinks to that Vega checkpoint under the names the workflows use.

The Vega UNet is built on the meta device: only its LoRA tensors are materialised (745M parameters
would cost 3 GB and tens of seconds for nothing).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from mumu_core.bundle import add_unet_lora, make_bundle, save_bundle
from mumu_core.connector import MumuConnector
from mumu_core.data.tiny import build_tiny_grounding_dino, build_tiny_sam
from mumu_core.encoder import MumuEncoder
from mumu_core.presets import SDXL_UNET_CONFIG, TINY, build_vlm_folder
from mumu_core.testing import randomize_lora

# Segmind Vega in diffusers' terms (ComfyUI: transformer_depth [0,0,1,1,2,2], no mid-block transformer).
VEGA_UNET_CONFIG = {
    **SDXL_UNET_CONFIG,
    "transformer_layers_per_block": [1, 1, 2],
    "mid_block_type": "UNetMidBlock2D",
}
# TINY's VLM and connector, with the connector projecting to SDXL's widths; 16 tokens (56 px) per image
# by default keeps the CPU runs short.
COMFY_TEST_PRESET = replace(
    TINY,
    connector=replace(TINY.connector, context_dim=2048, pooled_dim=1280),
    unet=VEGA_UNET_CONFIG,
    unet_name="segmind/Segmind-Vega (random, tests)",
    tokens_per_image=16,
)
VLM_NAME = "idefics2-8b"
# Norm scales of the ldm UNet that are exactly 0 in a dead random checkpoint (the harness's make_ckpt.py once
# zeroed every 1-D parameter, GroupNorm scales included, so the UNet output was 0 for any input).
NORM_SCALE_KEYS = (
    "model.diffusion_model.out.0.weight",
    "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
    "model.diffusion_model.output_blocks.0.0.out_layers.0.weight",
)
BUNDLE_NAME = "mumu-sdxl.safetensors"
DETECTOR_NAME = "grounding-dino-base"  # the folder names the character-consistency workflow uses
SAM_NAME = "sam-vit-base"
CHECKPOINT_NAMES = ("sd_xl_base_1.0.safetensors", "animagine-xl-3.1.safetensors")


def dead_norm_scales(checkpoint: str | Path) -> list[str]:
    """The NORM_SCALE_KEYS of an SDXL ldm checkpoint that are missing or all zero (empty = a live model)."""
    from safetensors import safe_open

    bad = []
    with safe_open(str(checkpoint), framework="pt") as f:
        keys = set(f.keys())
        for k in NORM_SCALE_KEYS:
            if k not in keys or not bool(f.get_tensor(k).float().abs().sum() > 0):
                bad.append(k)
    return bad


def vega_unet_with_lora(seed: int = 0, rank: int = 4, alpha: float = 4.0):
    """A meta-device Vega UNet whose peft LoRA tensors are real and random."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**VEGA_UNET_CONFIG)
    add_unet_lora(unet, rank=rank, alpha=alpha)
    gen = torch.Generator().manual_seed(seed)
    for name, module in unet.named_modules():
        if name.endswith((".lora_A.default", ".lora_B.default")):
            module.to_empty(device="cpu")
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
    return unet


def build_comfy_models(root: str | Path, vega_checkpoint: str | Path | None = None, seed: int = 0) -> Path:
    """Write the models tree into ``root`` (reused if already complete); returns ``root``."""
    root = Path(root)
    bundle = root / "mumu" / BUNDLE_NAME
    vlm = root / "LLM" / VLM_NAME
    if not bundle.is_file():
        if not (vlm / "config.json").is_file():
            build_vlm_folder(COMFY_TEST_PRESET, vlm, seed=seed)
        encoder = MumuEncoder.from_pretrained(vlm)
        encoder.add_lora(rank=4, alpha=8.0)
        randomize_lora(encoder.vlm, seed + 1)
        torch.manual_seed(seed + 2)
        connector = MumuConnector(COMFY_TEST_PRESET.connector)
        unet = vega_unet_with_lora(seed + 3)
        save_bundle(make_bundle(COMFY_TEST_PRESET, connector, encoder, unet), bundle)
    if vega_checkpoint is not None:
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        for name in CHECKPOINT_NAMES:
            link = root / "checkpoints" / name
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(Path(vega_checkpoint).resolve(), link)
    detector = root / "grounding-dino" / DETECTOR_NAME
    if not (detector / "config.json").is_file():
        build_tiny_grounding_dino(detector, seed=seed)
    sam = root / "sams" / SAM_NAME
    if not (sam / "config.json").is_file():
        build_tiny_sam(sam, seed=seed)
    (root / "loras").mkdir(parents=True, exist_ok=True)
    return root


if __name__ == "__main__":
    import sys

    print(build_comfy_models(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
