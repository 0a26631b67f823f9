"""A pixel-space stand-in for the VAE, used by the ``mini`` preset.

At a 24 px canvas an SDXL VAE (8x downsampling) would leave a 3x3 latent, and training a tiny VAE
first would spend CPU time the 2-hour recipe does not have. So the mini UNet denoises pixels directly
in [-1, 1], and this module plays the VAE's part in diffusers' SDXL pipeline: same attributes the
pipeline reads (``config.scaling_factor``, ``config.block_out_channels`` -> scale factor 1,
``config.force_upcast``), identity encode/decode. The training and generation code stay the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_utils import ModelMixin


@dataclass
class _IdentityLatentDist:
    x: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.x

    def mode(self) -> torch.Tensor:
        return self.x


@dataclass
class PixelEncoderOutput:
    latent_dist: _IdentityLatentDist


class PixelSpaceVAE(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        channels: int = 3,
        block_out_channels: tuple[int, ...] = (3,),  # one block: the pipeline's scale factor is 1
        scaling_factor: float = 1.0,
        force_upcast: bool = False,
    ):
        super().__init__()
        # ModelMixin reads dtype/device from a parameter or buffer; an identity map has neither.
        self.register_buffer("anchor", torch.zeros(1), persistent=True)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        out = _IdentityLatentDist(x)
        return PixelEncoderOutput(out) if return_dict else (out,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        return DecoderOutput(sample=z) if return_dict else (z,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
