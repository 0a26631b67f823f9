"""The MUMU-mini path in ComfyUI: the pack's embedded model, sampled by a small MUMU node (no downloads).

ComfyUI's stock samplers only run UNets whose layout its model detection knows (SDXL, SSD-1B, Vega,
KOALA, ...), and MUMU-mini is a 24 px pixel-space UNet with a 2-layer Idefics2 (docs/MINI.md); making
ComfyUI sample it would mean monkey-patching its model detection. So the mini path is its own two nodes
over ``mumu_core``: the loader (``mumu_core.mini.demo.load_pipeline``, whatever model is shipped in
``mumu_core/mini/weights/model/``) and a sampler (``mumu_core.pipeline.MumuPipeline``: the same DDIM
sampling, zero negative and CFG as ``python -m mumu_core generate``). The prompt comes from the usual
MUMU Interleaved Prompt Builder, so the references are LoadImage nodes a user can swap. The model is a
few MB and runs on the CPU inside the node, outside ComfyUI's model management.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from mumu_core.mini.demo import MODEL_DIR, MiniModelError, load_pipeline, model_paths
from mumu_core.pipeline import MumuPipeline

from .model_folders import file_identity
from .prompt_spec import PromptSpec, describe
from .types import CATEGORY, MumuMiniModelType, MumuPromptType

log = logging.getLogger("ComfyUI-MUMU")
EMBEDDED = "embedded MUMU-mini"


def mini_identity() -> str:
    try:
        paths = model_paths(MODEL_DIR)  # the bundle and the base folders it names
    except MiniModelError:
        return "missing"
    roots = (MODEL_DIR, paths.vlm, paths.sdxl)
    files = sorted({p for r in roots for p in Path(r).rglob("*") if p.is_file()})
    return file_identity(*files) if files else "missing"


class MumuMiniLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMUMiniLoader",
            display_name="MUMU-mini Loader (embedded, no downloads)",
            category=f"{CATEGORY}/mini",
            description=(
                "Loads the MUMU-mini model shipped inside the pack (mumu_core/mini/weights/model/): a 24 px "
                "model of a synthetic world of coloured shapes, trained on 2 CPU cores. It takes colour (and "
                "partly shape) only from the reference images. For the MUMU-mini Sampler, not the KSampler."
            ),
            inputs=[
                io.Combo.Input(
                    "model", options=[EMBEDDED], default=EMBEDDED, tooltip="The model shipped in the pack."
                ),
                io.Boolean.Input(
                    "verify",
                    default=True,
                    tooltip="Check every file against the sha256 in weights/model.json.",
                ),
            ],
            outputs=[MumuMiniModelType.Output(display_name="mini_model")],
        )

    @classmethod
    def fingerprint_inputs(cls, model: str, verify: bool) -> str:
        # Reloads when the shipped files are replaced (a newly shipped model).
        return f"{mini_identity()}|{verify}"

    @classmethod
    def execute(cls, model: str, verify: bool = True) -> io.NodeOutput:
        if model != EMBEDDED:
            raise ValueError(f"model must be {EMBEDDED!r}, got {model!r}")
        # ComfyUI runs nodes under torch.inference_mode(); weights made there are inference tensors, which
        # mumu_core's cross-attention K/V cache cannot version-check (RuntimeError seen in ComfyUI).
        with torch.inference_mode(False):
            pipe = load_pipeline(verify=verify, device="cpu")
        log.info("MUMU: loaded the embedded MUMU-mini model from %s", MODEL_DIR)
        return io.NodeOutput(pipe)


def images_to_tensor(images, upscale: int) -> torch.Tensor:
    """PIL images -> ComfyUI IMAGE (B, H*upscale, W*upscale, 3) float 0..1, nearest-neighbour enlarged."""
    arrays = [np.asarray(im.convert("RGB"), np.float32) / 255.0 for im in images]
    x = torch.from_numpy(np.stack(arrays))
    if upscale > 1:
        x = x.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return x


class MumuMiniSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MUMUMiniSampler",
            display_name="MUMU-mini Sampler",
            category=f"{CATEGORY}/mini",
            description=(
                "Generates with the MUMU-mini model: DDIM with the zero negative, as python -m mumu_core "
                "generate does. A batch of B images on a Prompt Builder input makes B prompts; each gives "
                "`samples` images (prompt i is seeded seed + i). Output: 24 px images enlarged by `upscale`."
            ),
            inputs=[
                MumuMiniModelType.Input("mini_model"),
                MumuPromptType.Input("mumu_prompt"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True),
                io.Int.Input(
                    "steps", default=20, min=1, max=1000, tooltip="DDIM steps (the mini preset: 20)."
                ),
                io.Float.Input(
                    "cfg",
                    default=1.5,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="Guidance (the mini preset: 1.5).",
                ),
                io.Int.Input("samples", default=4, min=1, max=64, tooltip="Images per prompt."),
                io.Int.Input(
                    "upscale",
                    default=8,
                    min=1,
                    max=32,
                    tooltip="Nearest-neighbour enlargement of the 24 px output.",
                ),
            ],
            outputs=[io.Image.Output(display_name="images")],
        )

    @classmethod
    def execute(
        cls,
        mini_model,
        mumu_prompt,
        seed: int = 0,
        steps: int = 20,
        cfg: float = 1.5,
        samples: int = 4,
        upscale: int = 8,
    ) -> io.NodeOutput:
        if not isinstance(mini_model, MumuPipeline):
            raise TypeError(
                f"mini_model must come from the MUMU-mini Loader, got {type(mini_model).__name__}"
            )
        if not isinstance(mumu_prompt, PromptSpec):
            raise TypeError(
                f"mumu_prompt must come from the MUMU Interleaved Prompt Builder, got {type(mumu_prompt).__name__}"
            )
        mini_model.settings(steps, cfg, None, None, samples)  # every number checked before sampling
        prompts = mumu_prompt.prompts(mini_model.bundle.meta.tokens_per_image)
        bar = comfy.utils.ProgressBar(len(prompts))
        images = []
        for i, p in enumerate(prompts):
            mm.throw_exception_if_processing_interrupted()
            with torch.inference_mode(False), torch.no_grad():  # see MumuMiniLoader.execute
                images += mini_model(
                    [p], seed=seed + i, steps=steps, guidance=cfg, batch=samples, progress=False
                )
            bar.update_absolute(i + 1, len(prompts))
        log.info("MUMU-mini: %s -> %d image(s)", describe(mumu_prompt), len(images))
        return io.NodeOutput(images_to_tensor(images, upscale))
