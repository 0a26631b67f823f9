"""The ComfyExtension that ComfyUI's V3 loader receives from the repository's root __init__.py."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .encode import MumuEncoder
from .kv_cache_node import MumuKVCache
from .loaders import MumuLoader
from .lora import MumuLoraMerge, MumuSaveLora
from .mini import MumuMiniLoader, MumuMiniSampler
from .paths import register_folders
from .prompt import MumuPromptBuilder
from .segment import MumuSegmentReference

NODES: list[type[io.ComfyNode]] = [
    MumuLoader,
    MumuPromptBuilder,
    MumuEncoder,
    MumuLoraMerge,
    MumuSaveLora,
    MumuKVCache,
    MumuSegmentReference,
    MumuMiniLoader,
    MumuMiniSampler,
]


class MumuExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MumuExtension:
    # Before ComfyUI builds the schemas, whose dropdowns list these folders.
    register_folders()
    return MumuExtension()
