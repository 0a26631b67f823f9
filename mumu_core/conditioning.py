"""SDXL conditioning from MUMU prompts, and the one negative / condition-dropout convention.

SDXL's UNet reads three things: the cross-attention context (B, N, 2048), the pooled vector (B, 1280)
("text_embeds") and six micro-conditioning numbers ("time_ids": original size, crop top-left, target
size). MUMU replaces CLIP's context and pooled vector with the connector's outputs.

The negative (unconditional) conditioning is zeros of the positive's shape, as diffusers' SDXL does for
an empty negative prompt (``force_zeros_for_empty_prompt``). Training's condition dropout writes exactly
the same zeros, so classifier-free guidance at inference contrasts against what the model learned as
"no condition". With ``negative_pooled="keep"`` the pooled vector is kept in both (guidance then acts
through cross-attention only; the mini preset needs this, see docs/MINI.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from .connector import MumuConnector
from .encoder import MumuEncoder
from .prompt import InterleavedPrompt

NegativePooled = Literal["zeros", "keep"]


@dataclass
class SDXLConditioning:
    context: torch.Tensor  # (B, N, C)
    pooled: torch.Tensor  # (B, P)
    attention_mask: torch.Tensor  # (B, N) bool

    def negative(self, negative_pooled: NegativePooled = "zeros") -> SDXLConditioning:
        return drop_conditioning(self, torch.ones(self.context.shape[0], dtype=torch.bool), negative_pooled)

    def to(self, device=None, dtype=None) -> SDXLConditioning:
        return SDXLConditioning(
            self.context.to(device=device, dtype=dtype),
            self.pooled.to(device=device, dtype=dtype),
            self.attention_mask.to(device=device),
        )

    def repeat(self, n: int) -> SDXLConditioning:
        """Each prompt ``n`` times (images per prompt)."""
        return SDXLConditioning(
            self.context.repeat_interleave(n, 0),
            self.pooled.repeat_interleave(n, 0),
            self.attention_mask.repeat_interleave(n, 0),
        )


def drop_conditioning(
    cond: SDXLConditioning, drop: torch.Tensor, negative_pooled: NegativePooled = "zeros"
) -> SDXLConditioning:
    """Replace the samples where ``drop`` (B,) is true by the negative conditioning (zeros)."""
    keep = (~drop.to(cond.context.device)).to(cond.context.dtype)
    context = cond.context * keep[:, None, None]
    pooled = cond.pooled if negative_pooled == "keep" else cond.pooled * keep[:, None]
    return replace(cond, context=context, pooled=pooled)


def add_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """SDXL micro-conditioning, (B, 6): (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    ids = torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


class MumuConditioner(nn.Module):
    """Encoder + connector: prompts -> SDXL conditioning, with per-image weights applied."""

    def __init__(self, encoder: MumuEncoder, connector: MumuConnector) -> None:
        super().__init__()
        if encoder.hidden_size != connector.config.in_dim:
            raise ValueError(
                f"the connector expects {connector.config.in_dim}-d VLM states but the VLM gives "
                f"{encoder.hidden_size}-d: the bundle was made for another VLM"
            )
        self.encoder = encoder
        self.connector = connector

    def forward(self, prompts: Sequence[InterleavedPrompt]) -> SDXLConditioning:
        enc = self.encoder(prompts)
        connector_dtype = next(self.connector.parameters()).dtype
        context, pooled = self.connector(enc.hidden_states.to(connector_dtype), enc.attention_mask)
        context = apply_image_weights(context, enc.image_index, prompts)
        return SDXLConditioning(context, pooled, enc.attention_mask)

    encode = forward


def apply_image_weights(
    context: torch.Tensor, image_index: torch.Tensor, prompts: Sequence[InterleavedPrompt]
) -> torch.Tensor:
    """Scale each image's context tokens by its weight.

    Against the zero negative, scaling is the same as ComfyUI's prompt weighting, which interpolates
    between the unconditional and the conditional embedding.
    """
    weights = [[r.weight for r in p.images] for p in prompts]
    if all(w == 1.0 for ws in weights for w in ws):
        return context
    scale = torch.ones(image_index.shape, dtype=context.dtype, device=context.device)
    for b, ws in enumerate(weights):
        for j, w in enumerate(ws):
            scale[b][image_index[b] == j] = w
    return context * scale[..., None]
