"""Standalone MUMU generation without ComfyUI: diffusers' ``StableDiffusionXLPipeline`` fed embeddings.

The pipeline is built with no text encoders or tokenizers at all; MUMU's conditioner gives the
cross-attention context and the pooled vector, and the negative is the one convention of
``conditioning.SDXLConditioning.negative`` (zeros, or the bundle's ``negative_pooled="keep"``).
Defaults are the paper's: DDIM, 50 steps, CFG 6 (the preset's numbers).

Memory: the VLM (7B for the real model) and the UNet never sit on the accelerator together. The
conditioner is moved to the device only to encode, then back to the CPU before the UNet moves in.
Each prompt is encoded and sampled on its own unpadded context (padding would add zero keys to
cross-attention), so a batch of prompts gives exactly the images of running them one by one.

Cross-attention K/V cache (on by default, ``kv_cache=False`` turns it off): the UNet's ``attn2`` layers
project a prompt's context to keys and values once and reuse them at every step and in both CFG branches
(``mumu_core.kv_cache``); the cache is emptied after each prompt, which releases its memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .bundle import MumuBundle, apply_unet_lora, check_unet_compatible, load_bundle, load_conditioner
from .conditioning import SDXLConditioning
from .kv_cache import KVCache, install_kv_cache
from .presets import Preset, get_preset
from .prompt import InterleavedPrompt
from .sdxl import SDXLComponents, load_sdxl, sdxl_pipeline_class

MAX_SIDE = 4096
MAX_BATCH = 64


class GenerationError(ValueError):
    """Bad generation settings; the message says which and what is allowed."""


@dataclass(frozen=True)
class GenerationSettings:
    steps: int
    guidance: float
    width: int
    height: int
    batch: int


class MumuPipeline:
    def __init__(
        self,
        conditioner,
        components: SDXLComponents,
        bundle: MumuBundle,
        preset: Preset,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        kv_cache: bool = True,
    ) -> None:
        from diffusers import DDIMScheduler

        StableDiffusionXLPipeline = sdxl_pipeline_class()

        check_unet_compatible(bundle, dict(components.unet.config))
        self.conditioner = conditioner
        self.bundle = bundle
        self.preset = preset
        self.device = torch.device(device)
        self.dtype = dtype
        self.lora_scale = 1.0  # what from_paths applied; named when an output is not finite
        # The bundle records what the UNet was trained to predict; the sampler must agree with it.
        scheduler = DDIMScheduler.from_config(
            components.scheduler.config, prediction_type=bundle.meta.prediction_type
        )
        self.pipe = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=components.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        self.kv_cache = KVCache(enabled=kv_cache)
        install_kv_cache(components.unet, self.kv_cache)

    @classmethod
    def from_paths(
        cls,
        vlm: str | Path,
        bundle: str | Path | MumuBundle,
        sdxl: str | Path,
        preset: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        lora_scale: float = 1.0,
        kv_cache: bool = True,
    ) -> MumuPipeline:
        """Load everything from local paths. ``preset`` defaults to the one the bundle records."""
        from .bundle import BundleMismatchError

        bundle = bundle if isinstance(bundle, MumuBundle) else load_bundle(bundle)
        if preset is not None and preset != bundle.meta.preset:
            raise BundleMismatchError(
                f"--preset {preset!r} but the bundle was made for preset {bundle.meta.preset!r}: "
                "drop --preset or use a bundle of that preset"
            )
        p = get_preset(bundle.meta.preset)
        # Everything is loaded onto the CPU; each model moves to the device only while it works.
        components = load_sdxl(sdxl, p, dtype=dtype, device="cpu")
        check_unet_compatible(bundle, dict(components.unet.config))
        apply_unet_lora(components.unet, bundle, lora_scale)
        conditioner = load_conditioner(vlm, bundle, dtype=dtype, device="cpu")
        pipe = cls(conditioner, components, bundle, p, device=device, dtype=dtype, kv_cache=kv_cache)
        pipe.lora_scale = lora_scale
        return pipe

    # -- steps -----------------------------------------------------------------------------------
    def settings(
        self,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
    ) -> GenerationSettings:
        return resolve_settings(self.preset, steps, guidance, width, height, batch)

    @torch.no_grad()
    def encode(self, prompts: Sequence[InterleavedPrompt]) -> list[SDXLConditioning]:
        """One unpadded conditioning (on the CPU) per prompt; the VLM leaves the device afterwards."""
        self._to(self.pipe.unet, "cpu")
        self._to(self.pipe.vae, "cpu")
        self._to(self.conditioner, self.device)
        # One prompt at a time: a prompt's image must not depend on what else is in the batch, and
        # batched (padded) matmuls round differently from unbatched ones.
        try:
            out = [self.conditioner.encode([p]) for p in prompts]
        finally:
            self._to(self.conditioner, "cpu")
        return [c.to("cpu") for c in out]

    @torch.no_grad()
    def __call__(
        self,
        prompts: InterleavedPrompt | Sequence[InterleavedPrompt],
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        progress: bool = True,
    ) -> list[Image.Image]:
        """``batch`` images per prompt, in prompt order. Prompt ``i`` is seeded with ``seed + i``."""
        if isinstance(prompts, InterleavedPrompt):
            prompts = [prompts]
        if not prompts:
            raise GenerationError("give at least one prompt")
        s = self.settings(steps, guidance, width, height, batch)
        return self.draw(self.encode(prompts), seed, s, progress)

    @torch.no_grad()
    def draw(
        self,
        conds: Sequence[SDXLConditioning],
        seed: int,
        s: GenerationSettings,
        progress: bool = True,
        then: tuple[int, Sequence[SDXLConditioning]] | None = None,
    ) -> list[Image.Image]:
        """Sample from conditionings made by :meth:`encode` (which diagnostics may mix: the probe swaps the
        pooled vector between prompts); ``s`` from :meth:`settings`. Conditioning ``i`` is seeded ``seed + i``.

        ``then=(k, later)``: after ``k`` sampling steps, conditioning ``i`` is replaced by ``later[i]`` (a
        diagnostic of which steps decide what; ``k=0`` samples from ``later`` alone)."""
        if not conds:
            raise GenerationError("give at least one conditioning")
        if then is not None and not (then[0] >= 0 and len(then[1]) == len(conds)):
            raise GenerationError(
                f"then=(k, later) needs k >= 0 and one later conditioning per conditioning ({len(conds)}), "
                f"got k={then[0]} and {len(then[1])}"
            )
        self.kv_cache.clear()  # nothing left from a call that raised
        self._to(self.pipe.unet, self.device)
        self._to(self.pipe.vae, self.device)
        self.pipe.set_progress_bar_config(disable=not progress)
        images: list[Image.Image] = []
        for i, cond in enumerate(conds):
            switch = None
            if then is not None and then[0] == 0:
                cond = then[1][i]
            elif then is not None:
                switch = self._switch_after(then[0], then[1][i], s.batch)
            neg = cond.negative(self.bundle.meta.negative_pooled)
            cond, neg = cond.to(self.device, self.dtype), neg.to(self.device, self.dtype)
            out = self.pipe(
                prompt_embeds=cond.context,
                pooled_prompt_embeds=cond.pooled,
                negative_prompt_embeds=neg.context,
                negative_pooled_prompt_embeds=neg.pooled,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                width=s.width,
                height=s.height,
                num_images_per_prompt=s.batch,
                # SDXL micro-conditioning: the image is generated at, and stands for, this size uncropped.
                original_size=(s.height, s.width),
                target_size=(s.height, s.width),
                crops_coords_top_left=(0, 0),
                generator=torch.Generator("cpu").manual_seed(seed + i),
                output_type="np",  # checked for NaN/inf before it becomes an (all-black) PNG
                callback_on_step_end=switch,
                callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"],
            )
            self.kv_cache.clear()  # this prompt's K/V are released before the next prompt samples
            check_finite_output(out.images, cond, self, s)
            images.extend(self.pipe.numpy_to_pil(out.images))
        return images

    def _switch_after(self, k: int, later: SDXLConditioning, batch: int):
        """A diffusers step-end callback that swaps in ``later`` (and its negative) after step ``k``."""
        neg = later.negative(self.bundle.meta.negative_pooled).repeat(batch).to(self.device, self.dtype)
        later = later.repeat(batch).to(self.device, self.dtype)

        def callback(pipe, step: int, t, tensors: dict) -> dict:
            if step != k - 1:
                return {}
            if pipe.do_classifier_free_guidance:  # the pipeline's batch is [negative, positive]
                return {
                    "prompt_embeds": torch.cat([neg.context, later.context]),
                    "add_text_embeds": torch.cat([neg.pooled, later.pooled]),
                }
            return {"prompt_embeds": later.context, "add_text_embeds": later.pooled}

        return callback

    def _to(self, module: torch.nn.Module, device: str | torch.device) -> None:
        device = torch.device(device)
        if self.device.type == "cpu":
            return  # nothing to offload
        module.to(device)
        if device.type == "cpu" and torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_finite_output(images, cond: SDXLConditioning, pipe: MumuPipeline, s: GenerationSettings) -> None:
    """NaN/inf pixels are an error naming the likely cause, never a black image with exit 0."""
    import numpy as np

    if np.isfinite(images).all():
        return
    if not (torch.isfinite(cond.context).all() and torch.isfinite(cond.pooled).all()):
        cause = (
            "the conditioning itself is not finite: the bundle's connector or VLM LoRA is broken or made "
            "for another VLM, or the VLM overflows in this dtype"
        )
    else:
        cause = "the conditioning is finite, so the UNet or the VAE overflowed"
    raise GenerationError(
        f"the generated image has NaN/inf pixels ({cause}). Likely causes: the bundle "
        f"({pipe.bundle.meta.preset} preset) does not fit this SDXL checkpoint or is broken; the LoRA scale "
        f"{pipe.lora_scale} or the guidance {s.guidance} is too large; dtype {str(pipe.dtype).split('.')[-1]} "
        "overflows (SDXL's VAE overflows in float16: use float32 or bfloat16). Nothing was written"
    )


def resolve_settings(
    preset: Preset,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    batch: int = 1,
) -> GenerationSettings:
    """Fill in the preset's defaults and check every number (before any model is loaded)."""
    s = GenerationSettings(
        steps=preset.num_inference_steps if steps is None else steps,
        guidance=preset.guidance_scale if guidance is None else guidance,
        width=preset.resolution if width is None else width,
        height=preset.resolution if height is None else height,
        batch=batch,
    )
    if not 1 <= s.steps <= 1000:
        raise GenerationError(f"steps must be between 1 and 1000, got {s.steps}")
    if not (s.guidance >= 0 and s.guidance < float("inf")):
        raise GenerationError(f"guidance (CFG scale) must be a finite number >= 0, got {s.guidance}")
    for name, v in (("width", s.width), ("height", s.height)):
        if not (8 <= v <= MAX_SIDE) or v % 8:
            raise GenerationError(f"{name} must be a multiple of 8 between 8 and {MAX_SIDE}, got {v}")
    if not 1 <= s.batch <= MAX_BATCH:
        raise GenerationError(f"batch must be between 1 and {MAX_BATCH}, got {s.batch}")
    return s
