"""MUMU core: interleaved prompts -> perceiver-free Idefics2 -> connector -> SDXL conditioning.

Pure torch / transformers / diffusers / peft. Never imports ComfyUI, ``train`` or ``nodes``.
Submodules are imported lazily by their users so that ``import mumu_core`` stays cheap.
"""

__version__ = "0.1.0"
