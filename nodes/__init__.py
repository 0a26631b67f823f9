"""ComfyUI glue for MUMU.

This package is imported by ComfyUI through the repository's root ``__init__.py`` (which calls
:func:`nodes.extension.comfy_entrypoint`). The modules are split in two kinds:

* comfy-free modules, importable and tested without ComfyUI: ``conditioning_format`` (the CONDITIONING
  structure SDXL sampling reads, SDXL and LoRA key checks), ``prompt_spec`` (what the Prompt Builder's
  inputs mean, batching rules, cache digests), ``encoding`` (cached encoding), ``model_folders``
  (listing and resolving model folders);
* ComfyUI modules, which import ``comfy`` / ``comfy_api`` / ``folder_paths``: ``types``, ``paths``,
  ``loaders``, ``prompt``, ``encode``, ``lora``, ``extension``.

Nothing here is imported on ``import nodes`` so that the pure modules stay importable everywhere.
Modules import each other relatively: inside ComfyUI the top-level name ``nodes`` is ComfyUI's own
``nodes.py``, never this package.
"""
