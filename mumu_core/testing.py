"""A complete random-init model set in a folder, for tests, demos and benchmarks (no pytest needed).

``build_tiny_models(root)`` writes, from the same library classes as the real models:

- ``vlm/``: an Idefics2 folder (presets.build_vlm_folder),
- ``sdxl/``: a diffusers SDXL folder (unet/, vae/, scheduler/),
- ``sdxl_single.safetensors``: the same UNet + VAE as one original-layout (ldm) checkpoint,
- ``bundle.safetensors``: connector + VLM LoRA + UNet LoRA, LoRAs with non-zero random ``B`` so that
  they change outputs (peft initialises ``B`` to zero, which would make every LoRA test pass vacuously),
- ``images/ref1.png``, ``images/ref2.png``: small reference pictures,
- for the synthetic-data commands (``mumu_core.data.tiny_synth``): the tiny preset's ``sdxl/`` also holds
  SDXL's two text encoders + tokenizers (a complete ``StableDiffusionXLPipeline`` folder), ``pickscore/``
  (a CLIPModel + CLIPProcessor, PickScore's classes) and ``llm/`` (a causal LM with a chat template).

The set is built once per folder: a finished folder carries a stamp and is reused (also across
processes); building happens in a temporary sibling folder that is renamed into place, so a crash or a
concurrent builder never leaves a half-written set behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .presets import Preset, build_sdxl_folder, build_vlm_folder, get_preset

# Bump when the layout or content of the set changes, so stale cached folders are rebuilt.
TINY_SET_VERSION = "2"
_STAMP = ".mumu_tiny_models"
_CACHE: dict[tuple[str, str], TinyModels] = {}


@dataclass(frozen=True)
class TinyModels:
    root: Path
    preset: Preset
    vlm: Path
    sdxl: Path
    sdxl_single_file: Path | None  # None for a pixel-space preset (nothing VAE-like to write)
    bundle: Path
    images: tuple[Path, ...]
    pickscore: Path | None = None  # CLIPModel + CLIPProcessor folder (data synth / score)
    llm: Path | None = None  # instruction causal LM folder (data prompts)


def build_tiny_models(root: str | Path, preset: str | Preset = "tiny", seed: int = 0) -> TinyModels:
    """Build (or reuse) the model set for ``preset`` ("tiny" or "mini") in ``root``."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(root).absolute()
    key = (str(root), preset.name)
    if key in _CACHE:
        return _CACHE[key]
    stamp = f"{TINY_SET_VERSION} {preset.name} {seed}"
    if not (root / _STAMP).is_file() or (root / _STAMP).read_text() != stamp:
        if root.exists() and any(root.iterdir()):
            if not (root / _STAMP).is_file():
                raise FileExistsError(
                    f"{root} exists and is not a MUMU tiny model set: give an empty or new folder"
                )
            shutil.rmtree(root)  # a stale set of ours (older version or other preset/seed)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.building."))
        try:
            _build(tmp, preset, seed)
            (tmp / _STAMP).write_text(stamp)
            if root.exists():
                root.rmdir()  # empty (checked above)
            os.replace(tmp, root)
        except OSError:
            # Another process finished first: use its set if complete.
            shutil.rmtree(tmp, ignore_errors=True)
            if not ((root / _STAMP).is_file() and (root / _STAMP).read_text() == stamp):
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    models = _describe(root, preset)
    _CACHE[key] = models
    return models


def _describe(root: Path, preset: Preset) -> TinyModels:
    single = root / "sdxl_single.safetensors"
    return TinyModels(
        root=root,
        preset=preset,
        vlm=root / "vlm",
        sdxl=root / "sdxl",
        sdxl_single_file=single if single.is_file() else None,
        bundle=root / "bundle.safetensors",
        images=(root / "images" / "ref1.png", root / "images" / "ref2.png"),
        pickscore=root / "pickscore" if (root / "pickscore").is_dir() else None,
        llm=root / "llm" if (root / "llm").is_dir() else None,
    )


def randomize_lora(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Give every LoRA ``B`` matrix random values (peft starts them at zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _build(root: Path, preset: Preset, seed: int) -> None:
    from safetensors.torch import save_file

    from .bundle import add_unet_lora, make_bundle, save_bundle
    from .connector import MumuConnector
    from .data.tiny_synth import add_sdxl_text_encoders, build_tiny_instruct_llm, build_tiny_pickscore
    from .encoder import MumuEncoder
    from .sdxl import components_to_ldm, load_sdxl

    build_vlm_folder(preset, root / "vlm", seed=seed)
    build_sdxl_folder(preset, root / "sdxl", seed=seed)
    comps = load_sdxl(root / "sdxl", preset)
    if type(comps.vae).__name__ == "AutoencoderKL":
        save_file(components_to_ldm(comps.unet, comps.vae), str(root / "sdxl_single.safetensors"))
        # Text side for text-to-image (data synth): widths that fit the UNet's context and pooled inputs.
        pooled = (
            preset.unet["projection_class_embeddings_input_dim"] - 6 * preset.unet["addition_time_embed_dim"]
        )
        add_sdxl_text_encoders(root / "sdxl", preset.unet["cross_attention_dim"], pooled, seed=seed + 4)
    build_tiny_pickscore(root / "pickscore", seed=seed + 5)
    build_tiny_instruct_llm(root / "llm", seed=seed + 6)

    encoder = MumuEncoder.from_pretrained(root / "vlm")
    encoder.add_lora(rank=4, alpha=8.0)
    randomize_lora(encoder.vlm, seed + 1)
    torch.manual_seed(seed + 2)
    connector = MumuConnector(preset.connector)
    unet = comps.unet
    add_unet_lora(unet, rank=4, alpha=8.0)
    randomize_lora(unet, seed + 3)
    save_bundle(make_bundle(preset, connector, encoder, unet), root / "bundle.safetensors")

    (root / "images").mkdir()
    rng = np.random.default_rng(seed)
    for i, size in enumerate(((40, 30), (24, 36)), start=1):
        # Smooth colour fields rather than noise: JPEG/PNG-friendly and closer to photos.
        h, w = size[1], size[0]
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.uniform(0, 255, 3)
        img = (base + 80 * np.sin(xx[..., None] / (3 + i) + yy[..., None] / 5 + np.arange(3))) % 256
        Image.fromarray(img.astype(np.uint8), "RGB").save(root / "images" / f"ref{i}.png")
