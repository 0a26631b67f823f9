"""MUMU Loader: Idefics2 base folder + bundle -> MUMU_MODEL, managed by ComfyUI's ModelPatcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management as mm
import comfy.model_patcher
import torch
from comfy_api.latest import io

from mumu_core.bundle import BundleMeta, load_bundle, load_conditioner

from . import paths
from .conditioning_format import SDXL_ADM_CHANNELS, SDXL_CONTEXT_DIM, SDXL_POOLED_DIM, ConditioningFormatError
from .model_folders import ModelFileError, file_identity
from .types import CATEGORY, MumuModelType

log = logging.getLogger("ComfyUI-MUMU")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ["auto", *DTYPES]
POLICY_OFFLOAD = "offload after encoding"
POLICY_KEEP = "keep loaded"
POLICY_CPU = "cpu only"
DEVICE_POLICIES = [POLICY_OFFLOAD, POLICY_KEEP, POLICY_CPU]


@dataclass
class MumuModel:
    """The MUMU_MODEL value: the conditioner inside a ModelPatcher, plus what the other nodes read."""

    patcher: comfy.model_patcher.ModelPatcher
    meta: BundleMeta
    identity: str  # files + dtype; keys the encoding cache
    policy: str
    vlm_name: str
    bundle_name: str

    @property
    def conditioner(self):
        return self.patcher.model

    def __repr__(self) -> str:
        return f"MumuModel({self.vlm_name} + {self.bundle_name}, {self.policy})"


def resolve_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    # Mistral-7B overflows in float16 more easily than in bfloat16, so prefer bf16 where supported.
    if mm.should_use_bf16(load_device, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(load_device, prioritize_performance=False):
        return torch.float16
    return torch.float32


def check_bundle_for_sdxl(meta: BundleMeta, bundle_name: str) -> None:
    """A bundle for a tiny/mini test UNet cannot condition SDXL; say so at load time."""
    c = meta.connector
    base = meta.base_unet
    if (
        c.context_dim != SDXL_CONTEXT_DIM
        or c.pooled_dim != SDXL_POOLED_DIM
        or base.get("projection_class_embeddings_input_dim") != SDXL_ADM_CHANNELS
    ):
        raise ConditioningFormatError(
            f"bundle {bundle_name} was made for UNet {base.get('name')!r} (connector context {c.context_dim}, "
            f"pooled {c.pooled_dim}, adm {base.get('projection_class_embeddings_input_dim')}), not for SDXL "
            f"(context {SDXL_CONTEXT_DIM}, pooled {SDXL_POOLED_DIM}, adm {SDXL_ADM_CHANNELS}): it cannot "
            "condition ComfyUI's SDXL models. Use a bundle trained for SDXL."
        )


def model_identity(vlm_dir: Path, bundle_file: Path, dtype: torch.dtype) -> str:
    weights = sorted(vlm_dir.glob("*.safetensors"))
    return f"{file_identity(bundle_file, vlm_dir / 'config.json', *weights)}|{dtype}"


def unload(model: MumuModel) -> None:
    """Move the conditioner back to its offload device now, so it is not on the GPU while SDXL samples.

    ComfyUI 0.3.x has no public call that unloads one model; this does what its free_memory() does for
    the one LoadedModel that wraps our patcher.
    """
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is model.patcher:
            loaded.model_unload()
            mm.current_loaded_models.pop(i)
            mm.soft_empty_cache()


class MumuLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMULoader",
            display_name="MUMU Loader",
            category=f"{CATEGORY}/loaders",
            description=(
                "Loads the Idefics2 base (a Hugging Face folder in models/LLM/) with a MUMU bundle "
                "(models/mumu/*.safetensors: connector + LoRAs)."
            ),
            inputs=[
                io.Combo.Input(
                    "vlm",
                    options=paths.vlm_choices(),
                    tooltip="Idefics2 folder under models/LLM/ (sub-folders holding a config.json).",
                ),
                io.Combo.Input(
                    "bundle", options=paths.bundle_choices(), tooltip="MUMU bundle in models/mumu/."
                ),
                io.Combo.Input(
                    "dtype",
                    options=DTYPE_CHOICES,
                    default="auto",
                    tooltip="auto: bfloat16 where the device supports it, else float16, else float32 (CPU).",
                ),
                io.Combo.Input(
                    "device",
                    options=DEVICE_POLICIES,
                    default=POLICY_OFFLOAD,
                    tooltip=(
                        "offload after encoding: the VLM leaves the GPU before sampling (default). "
                        "keep loaded: it stays while memory allows (faster re-encoding). cpu only: never on the GPU."
                    ),
                ),
            ],
            outputs=[MumuModelType.Output(display_name="mumu_model")],
        )

    @classmethod
    def validate_inputs(cls, vlm: str) -> bool | str:
        # Taking vlm here replaces ComfyUI's "Value not in list" by a message naming the exact expected
        # path and what belongs there. Only vlm: ComfyUI reports a failed validate_inputs against every
        # input it takes, so taking bundle too would flag a good bundle whenever the VLM is missing. The
        # bundle keeps ComfyUI's own dropdown check at queue time, and execute() names its path.
        try:
            paths.vlm_path(vlm)
        except ModelFileError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, vlm: str, bundle: str, dtype: str, device: str) -> str:
        # Stable while the files are unchanged, so ComfyUI reuses the loaded model; changes when a file
        # is replaced on disk.
        try:
            v, b = paths.vlm_path(vlm), paths.bundle_path(bundle)
            return f"{model_identity(v, b, torch.float32)}|{dtype}|{device}"
        except (ModelFileError, OSError):
            return f"missing|{vlm}|{bundle}"

    @classmethod
    def execute(cls, vlm: str, bundle: str, dtype: str, device: str) -> io.NodeOutput:
        if device not in DEVICE_POLICIES:
            raise ValueError(f"device must be one of {DEVICE_POLICIES}, got {device!r}")
        vlm_dir, bundle_file = paths.vlm_path(vlm), paths.bundle_path(bundle)
        b = load_bundle(bundle_file)
        check_bundle_for_sdxl(b.meta, bundle)
        offload_device = mm.text_encoder_offload_device()
        load_device = offload_device if device == POLICY_CPU else mm.text_encoder_device()
        torch_dtype = resolve_dtype(dtype, load_device)
        conditioner = load_conditioner(vlm_dir, b, dtype=torch_dtype, device=offload_device)
        patcher = comfy.model_patcher.ModelPatcher(
            conditioner, load_device=load_device, offload_device=offload_device
        )
        log.info("MUMU: loaded %s + %s (%s, %s, %s)", vlm, bundle, torch_dtype, load_device, device)
        model = MumuModel(
            patcher, b.meta, model_identity(vlm_dir, bundle_file, torch_dtype), device, vlm, bundle
        )
        return io.NodeOutput(model)
