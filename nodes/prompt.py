"""Interleaved Prompt Builder: text with <image>/<imageN> placeholders + reference image slots."""

from __future__ import annotations

from comfy_api.latest import io

from .prompt_spec import DEFAULT_TOKENS, MAX_IMAGES, TOKEN_CHOICES, build_prompt_spec
from .types import CATEGORY, MumuPromptType

DESCRIPTION = (
    "Text with <image> (next image in order) or <image1>..<image4> placeholders, and up to "
    f"{MAX_IMAGES} reference images. A batch of B images on one input makes B prompts (one per image; "
    "inputs with one image are shared; use an Empty Latent batch of B). A mask (1 = keep) blanks its "
    "image's background to black. tokens: image size in VLM tokens (a square: 324 = 18x18 patches, "
    "1296 = 36x36 for faces); default = the bundle's. weight scales the image's conditioning tokens."
)


class MumuPromptBuilder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs: list = [
            io.String.Input(
                "text",
                multiline=True,
                default="a <image1> man and his <image2> dog in an <image3> animated style",
                tooltip="Prompt with <image> or <imageN> placeholders (one style per prompt, each image once).",
            )
        ]
        for i in range(1, MAX_IMAGES + 1):
            inputs += [
                io.Image.Input(
                    f"image{i}", optional=True, tooltip=f"Reference for <image{i}> (or the {i}. <image>)."
                ),
                io.Mask.Input(
                    f"mask{i}", optional=True, tooltip="1 = keep; the rest of the image becomes black."
                ),
                io.Combo.Input(
                    f"tokens{i}",
                    options=TOKEN_CHOICES,
                    default=DEFAULT_TOKENS,
                    tooltip="VLM tokens for this image.",
                ),
                io.Float.Input(
                    f"weight{i}",
                    default=1.0,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="Scales this image's tokens.",
                ),
            ]
        return io.Schema(
            node_id="MUMUPromptBuilder",
            display_name="MUMU Interleaved Prompt Builder",
            category=CATEGORY,
            description=DESCRIPTION,
            inputs=inputs,
            outputs=[MumuPromptType.Output(display_name="mumu_prompt")],
        )

    @classmethod
    def execute(cls, text: str, **slots) -> io.NodeOutput:
        r = range(1, MAX_IMAGES + 1)
        spec = build_prompt_spec(
            text,
            images=[slots.get(f"image{i}") for i in r],
            masks=[slots.get(f"mask{i}") for i in r],
            tokens=[slots.get(f"tokens{i}", DEFAULT_TOKENS) for i in r],
            weights=[slots.get(f"weight{i}", 1.0) for i in r],
        )
        return io.NodeOutput(spec)
