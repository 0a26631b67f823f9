"""The bundle's UNet LoRA in ComfyUI: merged into any SDXL MODEL, or saved as a kohya LoRA file."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.lora
import comfy.sd
import folder_paths
from comfy_api.latest import io, ui

from mumu_core.bundle import (
    BundleMismatchError,
    MumuBundle,
    check_unet_compatible,
    export_kohya_unet_lora,
    kohya_unet_lora,
    load_bundle,
)

from . import paths
from .conditioning_format import check_sdxl_unet_config, kohya_module_names, missing_lora_modules
from .kv_cache import with_kv_cache
from .model_folders import ModelFileError
from .types import CATEGORY

log = logging.getLogger("ComfyUI-MUMU")


def comfy_unet_config(model) -> dict:
    """The ComfyUI unet_config (ldm names) of a MODEL (a ModelPatcher around a comfy BaseModel)."""
    inner = getattr(model, "model", None)
    config = getattr(getattr(inner, "model_config", None), "unet_config", None)
    if not isinstance(config, dict):
        raise TypeError(
            f"expected a ComfyUI MODEL (e.g. from Load Checkpoint), got {type(model).__name__} without a UNet config"
        )
    return config


def check_model_for_bundle(model, bundle: MumuBundle, bundle_name: str) -> None:
    cfg = comfy_unet_config(model)
    check_sdxl_unet_config(cfg, "the MODEL")
    check_unet_compatible(
        bundle,
        {
            "cross_attention_dim": cfg.get("context_dim"),
            "projection_class_embeddings_input_dim": cfg.get("adm_in_channels"),
            "in_channels": cfg.get("in_channels"),
        },
    )


def checked_lora(model, bundle: MumuBundle, bundle_name: str) -> dict:
    """The kohya LoRA of ``bundle``, with every module present in ``model`` (else a clear error).

    ComfyUI itself only logs "lora key not loaded" for keys it cannot place; a partial LoRA silently
    changes the result, so it is refused here instead.
    """
    check_model_for_bundle(model, bundle, bundle_name)
    lora_sd = kohya_unet_lora(bundle)
    names = kohya_module_names(lora_sd)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    missing = missing_lora_modules(names, key_map)
    if missing:
        raise BundleMismatchError(
            f"{len(missing)} of the {len(names)} LoRA modules of bundle {bundle_name} do not exist in this MODEL "
            f"(e.g. {missing[:3]}): the bundle was trained for another UNet layout "
            f"({bundle.meta.base_unet.get('name')!r})"
        )
    return lora_sd


def _bundle(name: str) -> MumuBundle:
    return load_bundle(paths.bundle_path(name))


def _validate_bundle(bundle: str) -> bool | str:
    try:
        paths.bundle_path(bundle)
    except ModelFileError as e:
        return str(e)
    return True


class MumuLoraMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMULoraMerge",
            display_name="MUMU LoRA Merge",
            category=f"{CATEGORY}/lora",
            description=(
                "Applies the bundle's UNet LoRA to an SDXL MODEL (SDXL base or a community fine-tune) with "
                "ComfyUI's own LoRA patching. Feed the result to a KSampler, or to Save Checkpoint to write "
                "a merged checkpoint."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SDXL-family MODEL."),
                io.Combo.Input(
                    "bundle", options=paths.bundle_choices(), tooltip="MUMU bundle in models/mumu/."
                ),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def validate_inputs(cls, bundle: str) -> bool | str:
        return _validate_bundle(bundle)

    @classmethod
    def execute(cls, model, bundle: str, strength: float) -> io.NodeOutput:
        b = _bundle(bundle)
        lora_sd = checked_lora(model, b, bundle)
        if strength == 0:
            return io.NodeOutput(with_kv_cache(model))
        merged, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)
        log.info(
            "MUMU: applied the UNet LoRA of %s (%d tensors) at strength %s", bundle, len(lora_sd), strength
        )
        # The cross-attention K/V cache rides on the MODEL; MUMU Encoder's kv_cache setting switches it.
        return io.NodeOutput(with_kv_cache(merged))


def next_lora_path(filename_prefix: str) -> Path:
    """models/loras/<prefix>_00001_.safetensors, never overwriting (ComfyUI's save-name scheme)."""
    loras = str(paths.loras_dir())
    folder, filename, counter, _subfolder, _prefix = folder_paths.get_save_image_path(filename_prefix, loras)
    return Path(folder) / f"{filename}_{counter:05}_.safetensors"


class MumuSaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMUSaveLora",
            display_name="MUMU Save UNet LoRA",
            category=f"{CATEGORY}/lora",
            description=(
                "Writes the bundle's UNet LoRA as a kohya LoRA (lora_unet_* keys) into models/loras/, "
                "loadable by LoraLoaderModelOnly. It only helps with MUMU conditioning, not CLIP text."
            ),
            inputs=[
                io.Combo.Input(
                    "bundle", options=paths.bundle_choices(), tooltip="MUMU bundle in models/mumu/."
                ),
                io.String.Input("filename_prefix", default="mumu/mumu_unet_lora"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, bundle: str) -> bool | str:
        return _validate_bundle(bundle)

    @classmethod
    def execute(cls, bundle: str, filename_prefix: str) -> io.NodeOutput:
        b = _bundle(bundle)
        kohya_module_names(kohya_unet_lora(b))  # refuse before writing anything ComfyUI would reject
        path = next_lora_path(filename_prefix)
        export_kohya_unet_lora(b, path)
        log.info("MUMU: saved the UNet LoRA of %s to %s", bundle, path)
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"saved {path}"))
