"""Readable exception type names in ComfyUI's UI (comfy-free).

ComfyUI shows a failed node's exception as ``<type.__module__>.<type.__qualname__>``. It imports a pack
under its folder path (``/path/to/custom_nodes/ComfyUI-MUMU`` with dots replaced), so an exception class
defined in ``nodes/`` would read ``/path/to/custom_nodes/ComfyUI-MUMU.nodes.conditioning_format.NotSDXLError``.
:func:`public_error` gives such a class the module name :data:`PUBLIC_MODULE` instead, so the UI shows
``ComfyUI-MUMU.NotSDXLError``. Errors from ``mumu_core`` need nothing: the pack registers it under its
own name (``mumu_core.prompt.PromptError``).
"""

from __future__ import annotations

from typing import TypeVar

PUBLIC_MODULE = "ComfyUI-MUMU"

E = TypeVar("E", bound=type[BaseException])


def public_error(cls: E) -> E:
    """Class decorator: name the exception ``ComfyUI-MUMU.<ClassName>`` wherever the pack is installed."""
    cls.__module__ = PUBLIC_MODULE
    return cls
