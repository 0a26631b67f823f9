"""ComfyUI's SDXL CONDITIONING structure, and the checks on SDXL models and kohya LoRAs (comfy-free).

ComfyUI's SDXL model (``comfy/model_base.py`` ``SDXL.encode_adm``) reads, per conditioning entry
``[context, extras]``: the cross-attention ``context`` (B, N, 2048) and from ``extras`` the pooled vector
``pooled_output`` (B, 1280, a KeyError without it) and the micro-conditioning ``width``, ``height``,
``crop_w``, ``crop_h``, ``target_width``, ``target_height``. Positive and negative are sampled in one batch
only when their contexts have compatible lengths (``comfy/conds.py``), which the zero negative of the
same shape guarantees (docs/ARCHITECTURE.md, "The negative / unconditional conditioning").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from mumu_core.conditioning import SDXLConditioning

from .errors import public_error

SDXL_CONTEXT_DIM = 2048
SDXL_POOLED_DIM = 1280
SDXL_ADM_CHANNELS = 2816  # pooled 1280 + 6 size numbers x 256 Fourier features
SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


@public_error
class ConditioningFormatError(ValueError):
    """A conditioning, model or LoRA does not have the SDXL shape ComfyUI needs; the message says why."""


@public_error
class NotSDXLError(ConditioningFormatError):
    pass


def size_info(
    width: int,
    height: int,
    crop_w: int = 0,
    crop_h: int = 0,
    target_width: int | None = None,
    target_height: int | None = None,
) -> dict[str, int]:
    """SDXL micro-conditioning as ComfyUI's CLIPTextEncodeSDXL writes it (target defaults to the size)."""
    values = {
        "width": width,
        "height": height,
        "crop_w": crop_w,
        "crop_h": crop_h,
        "target_width": width if target_width is None else target_width,
        "target_height": height if target_height is None else target_height,
    }
    for k, v in values.items():
        if not isinstance(v, int) or v < 0:
            raise ConditioningFormatError(f"{k} must be an integer >= 0, got {v!r}")
    return values


def stack_conditionings(conds: Sequence[SDXLConditioning]) -> SDXLConditioning:
    """One batch from single prompts: right-pad contexts with zeros (the connector's padding value)."""
    if not conds:
        raise ConditioningFormatError("no conditioning to stack: encode at least one prompt")
    n = max(c.context.shape[1] for c in conds)
    contexts, masks = [], []
    for c in conds:
        pad = n - c.context.shape[1]
        contexts.append(torch.nn.functional.pad(c.context, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(c.attention_mask, (0, pad), value=False))
    return SDXLConditioning(
        torch.cat(contexts), torch.cat([c.pooled for c in conds]), torch.cat(masks).bool()
    )


def check_sdxl_dims(cond: SDXLConditioning) -> None:
    c, p = cond.context, cond.pooled
    if c.ndim != 3 or c.shape[-1] != SDXL_CONTEXT_DIM or p.ndim != 2 or p.shape[-1] != SDXL_POOLED_DIM:
        raise ConditioningFormatError(
            f"the MUMU model gives context {tuple(c.shape)} and pooled {tuple(p.shape)}, but SDXL needs "
            f"(B, N, {SDXL_CONTEXT_DIM}) and (B, {SDXL_POOLED_DIM}): this bundle was not made for SDXL "
            "(a tiny or mini test bundle?)"
        )
    if c.shape[0] != p.shape[0]:
        raise ConditioningFormatError(f"context batch {c.shape[0]} differs from pooled batch {p.shape[0]}")


def to_comfy(
    cond: SDXLConditioning, sizes: Mapping[str, int], negative_pooled: str = "zeros"
) -> tuple[list[list[Any]], list[list[Any]]]:
    """(positive, negative) CONDITIONING lists for SDXL, float32 on the CPU.

    The negative is zeros of the positive's shape (pooled kept when the bundle says
    ``negative_pooled="keep"``), built by mumu_core's one definition of the negative.
    """
    check_sdxl_dims(cond)
    if negative_pooled not in ("zeros", "keep"):
        raise ConditioningFormatError(f"negative_pooled must be 'zeros' or 'keep', got {negative_pooled!r}")
    cond = cond.to(device="cpu", dtype=torch.float32)
    neg = cond.negative(negative_pooled)  # type: ignore[arg-type]
    extras = {k: int(sizes[k]) for k in SIZE_KEYS}
    positive = [[cond.context, {"pooled_output": cond.pooled, **extras}]]
    negative = [[neg.context, {"pooled_output": neg.pooled, **extras}]]
    return positive, negative


def check_latent_batch(prompts: int, latent: Mapping[str, Any] | None) -> None:
    """Refuse a conditioning batch that ComfyUI's sampler would silently cut or mix up.

    ComfyUI repeats or truncates a conditioning to the latent batch (``comfy.utils.repeat_to_batch_size``):
    with 3 prompts and a latent batch of 1, prompts 2 and 3 are dropped without a word. A latent batch that
    is a multiple of the prompt count is fine (latent i takes prompt i mod B). More than one prompt needs
    the latent connected, since nothing else tells the encoder the batch it will be sampled with.
    """
    if latent is None:
        if prompts > 1:
            raise ConditioningFormatError(
                f"this prompt makes {prompts} conditionings (a batch of {prompts} images on one image input): "
                "connect the KSampler's latent (an Empty Latent Image with batch_size "
                f"{prompts}) to the encoder's latent input. ComfyUI samples only as many conditionings as "
                "the latent batch and would drop the others silently."
            )
        return
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 1:
        raise ConditioningFormatError("latent must be a ComfyUI LATENT (a dict with a 'samples' tensor)")
    n = int(samples.shape[0])
    if n % prompts:
        raise ConditioningFormatError(
            f"the latent batch is {n} but the prompt makes {prompts} conditionings: ComfyUI would "
            f"{'drop' if n < prompts else 'unevenly repeat'} prompts. Set the Empty Latent Image's batch_size "
            f"to {prompts} (or a multiple of it)."
        )


def check_comfy_conditioning(conditioning: Any) -> None:
    """Raise unless ``conditioning`` has the exact structure ComfyUI's SDXL sampling reads."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ConditioningFormatError(
            f"CONDITIONING must be a non-empty list, got {type(conditioning).__name__}"
        )
    for i, entry in enumerate(conditioning):
        if not isinstance(entry, list) or len(entry) != 2:
            raise ConditioningFormatError(f"CONDITIONING entry {i} must be [tensor, dict]")
        context, extras = entry
        if (
            not isinstance(context, torch.Tensor)
            or context.ndim != 3
            or context.shape[-1] != SDXL_CONTEXT_DIM
        ):
            raise ConditioningFormatError(f"entry {i}: context must be a (B, N, {SDXL_CONTEXT_DIM}) tensor")
        if not isinstance(extras, dict) or "pooled_output" not in extras:
            raise ConditioningFormatError(f"entry {i}: the dict must hold pooled_output")
        pooled = extras["pooled_output"]
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (context.shape[0], SDXL_POOLED_DIM):
            raise ConditioningFormatError(
                f"entry {i}: pooled_output must be ({context.shape[0]}, {SDXL_POOLED_DIM}), "
                f"got {getattr(pooled, 'shape', None)}"
            )
        missing = [k for k in SIZE_KEYS if not isinstance(extras.get(k), int)]
        if missing:
            raise ConditioningFormatError(f"entry {i}: integer {missing} missing")


# -- SDXL model check ---------------------------------------------------------------------------------


def check_sdxl_unet_config(unet_config: Mapping[str, Any], what: str = "the MODEL") -> None:
    """Raise :class:`NotSDXLError` unless a ComfyUI ``unet_config`` (ldm names) is SDXL-family.

    SDXL-family = cross-attention context 2048 and ``adm_in_channels`` 2816 (SDXL, SSD-1B, Vega,
    KOALA, community fine-tunes of them); SD1.x / SD2.x / SDXL refiner / Flux fail with the reason.
    """
    context = unet_config.get("context_dim")
    adm = unet_config.get("adm_in_channels")
    if context != SDXL_CONTEXT_DIM or adm != SDXL_ADM_CHANNELS:
        raise NotSDXLError(
            f"{what} is not an SDXL model: its UNet has context_dim={context} and adm_in_channels={adm}, "
            f"MUMU needs an SDXL-family UNet (context_dim {SDXL_CONTEXT_DIM}, adm_in_channels "
            f"{SDXL_ADM_CHANNELS}). Load an SDXL checkpoint (SDXL base or an SDXL fine-tune)."
        )


def comfy_to_diffusers_unet_config(unet_config: Mapping[str, Any]) -> dict[str, Any]:
    """The two numbers a MUMU bundle records about its UNet, in diffusers' names."""
    return {
        "cross_attention_dim": unet_config.get("context_dim"),
        "projection_class_embeddings_input_dim": unet_config.get("adm_in_channels"),
        "block_out_channels": [
            unet_config.get("model_channels", 0) * m for m in unet_config.get("channel_mult", ())
        ],
    }


# -- kohya LoRA keys ----------------------------------------------------------------------------------

_KOHYA_KEY = re.compile(r"^(lora_unet_[A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


def kohya_module_names(state_dict: Iterable[str]) -> list[str]:
    """The ``lora_unet_*`` module names of a kohya UNet LoRA; raise on any key of another format."""
    names: dict[str, set[str]] = {}
    bad = []
    for key in state_dict:
        m = _KOHYA_KEY.match(key)
        if m is None:
            bad.append(key)
        else:
            names.setdefault(m.group(1), set()).add(m.group(2))
    if bad:
        raise ConditioningFormatError(
            f"{len(bad)} key(s) are not kohya UNet LoRA keys (lora_unet_<module>.lora_down.weight / "
            f".lora_up.weight / .alpha), e.g. {bad[:3]}: ComfyUI would reject them"
        )
    incomplete = sorted(
        n for n, parts in names.items() if not {"lora_down.weight", "lora_up.weight"} <= parts
    )
    if incomplete:
        raise ConditioningFormatError(f"LoRA modules without both lora_down and lora_up: {incomplete[:3]}")
    if not names:
        raise ConditioningFormatError("the bundle has no UNet LoRA (its unet_lora. tensors are empty)")
    return sorted(names)


def missing_lora_modules(module_names: Iterable[str], model_lora_keys: Iterable[str]) -> list[str]:
    """Module names the target model does not have (ComfyUI would log "lora key not loaded" for them)."""
    known = set(model_lora_keys)
    return sorted(n for n in module_names if n not in known)
