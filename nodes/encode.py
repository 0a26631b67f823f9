"""MUMU Encoder: MUMU model + MUMU prompt -> SDXL positive and negative CONDITIONING for the stock KSampler."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from .conditioning_format import check_latent_batch, size_info, to_comfy
from .encoding import GLOBAL_CACHE, encode_prompts
from .kv_cache import mark_conditioning
from .loaders import POLICY_KEEP, MumuModel, unload
from .prompt_spec import PromptSpec, describe
from .types import CATEGORY, MumuModelType, MumuPromptType

log = logging.getLogger("ComfyUI-MUMU")


def encode(
    model: MumuModel,
    spec: PromptSpec,
    width: int,
    height: int,
    crop_w: int,
    crop_h: int,
    target_width: int,
    target_height: int,
    latent=None,
    kv_cache: bool = True,
):
    if not isinstance(model, MumuModel):
        raise TypeError(f"mumu_model must come from the MUMU Loader, got {type(model).__name__}")
    if not isinstance(spec, PromptSpec):
        raise TypeError(
            f"mumu_prompt must come from the MUMU Interleaved Prompt Builder, got {type(spec).__name__}"
        )
    check_latent_batch(spec.batch, latent)
    prompts = spec.prompts(model.meta.tokens_per_image)
    bar = comfy.utils.ProgressBar(len(prompts))
    loaded = False

    def prepare() -> None:
        nonlocal loaded
        # ComfyUI's memory manager moves the conditioner to its load device (freeing others if needed).
        # force_full_load: the conditioner is plain torch (no comfy.ops casting), so a partial
        # low-VRAM load would leave layers on two devices.
        mm.load_models_gpu([model.patcher], force_full_load=True)
        loaded = True

    try:
        cond = encode_prompts(
            model.conditioner,
            prompts,
            model.identity,
            cache=GLOBAL_CACHE,
            prepare=prepare,
            on_progress=lambda done, total: bar.update_absolute(done, total),
            check_interrupt=mm.throw_exception_if_processing_interrupted,
        )
    finally:
        if loaded and model.policy != POLICY_KEEP:
            unload(model)
    log.info(
        "MUMU: encoded %s -> context %s (cache %d hits, %d misses)",
        describe(spec),
        tuple(cond.context.shape),
        GLOBAL_CACHE.hits,
        GLOBAL_CACHE.misses,
    )
    sizes = size_info(width, height, crop_w, crop_h, target_width, target_height)
    positive, negative = to_comfy(cond, sizes, model.meta.negative_pooled)
    # The K/V cache (installed on the MODEL by MUMU LoRA Merge) runs only for conditionings marked here.
    return mark_conditioning(positive, kv_cache), mark_conditioning(negative, kv_cache)


class MumuEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        def size(name: str, default: int, tip: str) -> io.Int.Input:
            return io.Int.Input(name, default=default, min=0, max=16384, step=8, tooltip=tip)

        return io.Schema(
            node_id="MUMUEncoder",
            display_name="MUMU Encoder",
            category=CATEGORY,
            description=(
                "Encodes a MUMU prompt into SDXL conditioning. The negative is zeros of the same shape "
                "(the convention MUMU is trained with), so connect both to the KSampler."
            ),
            inputs=[
                MumuModelType.Input("mumu_model"),
                MumuPromptType.Input("mumu_prompt"),
                size("width", 1024, "SDXL size conditioning: original width."),
                size("height", 1024, "SDXL size conditioning: original height."),
                size("crop_w", 0, "SDXL crop conditioning (0 = uncropped)."),
                size("crop_h", 0, "SDXL crop conditioning (0 = uncropped)."),
                size("target_width", 1024, "SDXL size conditioning: target width."),
                size("target_height", 1024, "SDXL size conditioning: target height."),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip=(
                        "The KSampler's latent_image. Needed for a batch of prompts: a latent batch that is not "
                        "a multiple of the prompt count is refused (ComfyUI would drop prompts silently)."
                    ),
                ),
                io.Boolean.Input(
                    "kv_cache",
                    default=True,
                    optional=True,
                    tooltip=(
                        "Cache the cross-attention keys/values of this conditioning for the whole sampling run "
                        "(same images, faster at long contexts; the MODEL must come through MUMU LoRA Merge). "
                        "Off: the UNet projects the context at every step, as stock ComfyUI does."
                    ),
                ),
            ],
            outputs=[
                io.Conditioning.Output("positive", display_name="positive"),
                io.Conditioning.Output("negative", display_name="negative"),
            ],
        )

    @classmethod
    def execute(
        cls,
        mumu_model,
        mumu_prompt,
        width: int = 1024,
        height: int = 1024,
        crop_w: int = 0,
        crop_h: int = 0,
        target_width: int = 1024,
        target_height: int = 1024,
        latent=None,
        kv_cache: bool = True,
    ) -> io.NodeOutput:
        positive, negative = encode(
            mumu_model,
            mumu_prompt,
            width,
            height,
            crop_w,
            crop_h,
            target_width,
            target_height,
            latent,
            kv_cache,
        )
        return io.NodeOutput(positive, negative)
