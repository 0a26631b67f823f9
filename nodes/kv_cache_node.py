"""MUMU Cross-Attention Cache: puts the K/V cache on any SDXL MODEL (MUMU LoRA Merge already does)."""

from __future__ import annotations

from comfy_api.latest import io

from .conditioning_format import check_sdxl_unet_config
from .kv_cache import with_kv_cache
from .lora import comfy_unet_config
from .types import CATEGORY


class MumuKVCache(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMUKVCache",
            display_name="MUMU Cross-Attention Cache",
            category=CATEGORY,
            description=(
                "Caches the cross-attention keys/values of MUMU conditioning for a whole sampling run (same "
                "images, much less work per step at long contexts). MUMU LoRA Merge already adds it; use this "
                "on a MODEL that does not come through it (e.g. a checkpoint with the MUMU LoRA fused in). "
                "The MUMU Encoder's kv_cache setting switches it per conditioning."
            ),
            inputs=[io.Model.Input("model", tooltip="An SDXL-family MODEL.")],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        check_sdxl_unet_config(comfy_unet_config(model), "the MODEL")
        return io.NodeOutput(with_kv_cache(model))
