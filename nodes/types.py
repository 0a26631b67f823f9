"""ComfyUI socket types of the pack (custom types travel only between MUMU nodes)."""

from __future__ import annotations

from comfy_api.latest import io

MumuModelType = io.Custom("MUMU_MODEL")
MumuPromptType = io.Custom("MUMU_PROMPT")
MumuBundleType = io.Custom("MUMU_BUNDLE")
MumuMiniModelType = io.Custom("MUMU_MINI_MODEL")

CATEGORY = "MUMU"
