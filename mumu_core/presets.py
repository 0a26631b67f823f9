"""Model presets: ``real`` (idefics2-8b + SDXL), ``tiny`` (tests) and ``mini`` (the CPU-trainable world).

A preset is configuration only. ``tiny`` and ``mini`` models are built from the same library classes as
the real ones (``Idefics2Config``/``Idefics2ForConditionalGeneration``, ``UNet2DConditionModel``,
``AutoencoderKL``) and saved in the same folder formats, so every loader is exercised exactly as it is
for real weights. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .connector import ConnectorConfig

IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"

# SDXL base 1.0's diffusers configs, written out so that single-file checkpoints load offline.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
# SDXL's training noise schedule; DDIM is the paper's sampler.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Preset:
    name: str
    vlm_name: str
    unet_name: str
    connector: ConnectorConfig
    unet: dict[str, Any]
    # None: a pixel-space stand-in (see mumu_core.pixel_vae); else an AutoencoderKL config.
    vae: dict[str, Any] | None
    scheduler: dict[str, Any]
    # Idefics2Config kwargs for presets whose VLM is built here (tiny, mini); None for real weights.
    vlm: dict[str, Any] | None = None
    tokens_per_image: int = 324
    resolution: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    negative_pooled: Literal["zeros", "keep"] = "zeros"
    hidden_state_layer: int = -1
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


REAL = Preset(
    name="real",
    vlm_name="HuggingFaceM4/idefics2-8b",
    unet_name="stabilityai/stable-diffusion-xl-base-1.0",
    # width 1024: ~200M parameters over 16 layers, small next to the 7B VLM and SDXL's 2.6B UNet, and
    # wide enough for 16 heads of 64; the paper does not give the width. Output projects to 2048.
    connector=ConnectorConfig(
        in_dim=4096, width=1024, layers=16, heads=16, context_dim=2048, pooled_dim=1280
    ),
    unet=SDXL_UNET_CONFIG,
    vae=SDXL_VAE_CONFIG,
    scheduler=SDXL_SCHEDULER_CONFIG,
    tokens_per_image=324,
    resolution=1024,
)

_TINY_VLM = {
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 56,
        "patch_size": 14,
    },
    "perceiver_config": {
        "hidden_size": 64,
        "resampler_n_latents": 4,
        "resampler_depth": 1,
        "resampler_n_heads": 2,
        "resampler_head_dim": 8,
        "num_key_value_heads": 1,
    },
    "text_config": {
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
    },
}
TINY = Preset(
    name="tiny",
    vlm_name="mumu/tiny-idefics2",
    unet_name="mumu/tiny-sdxl",
    connector=ConnectorConfig(in_dim=64, width=32, layers=2, heads=2, context_dim=64, pooled_dim=32),
    unet={
        **SDXL_UNET_CONFIG,
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1],
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,
        "norm_num_groups": 8,
        "sample_size": 16,
    },
    vae={
        **SDXL_VAE_CONFIG,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 32,
        "force_upcast": False,
    },
    scheduler=SDXL_SCHEDULER_CONFIG,
    vlm=_TINY_VLM,
    tokens_per_image=4,
    resolution=32,
    num_inference_steps=4,
)

# MUMU-mini: a pixel-space SDXL-class UNet on a 24x24 canvas with a small Idefics2-class VLM whose
# patch is 4 px, so a 16 px crop is 16 tokens (see docs/MINI.md for why each choice).
MINI = Preset(
    name="mini",
    vlm_name="mumu/mini-idefics2",
    unet_name="mumu/mini-sdxl",
    connector=ConnectorConfig(in_dim=64, width=64, layers=2, heads=4, context_dim=64, pooled_dim=64),
    unet={
        **SDXL_UNET_CONFIG,
        "in_channels": 3,
        "out_channels": 3,
        "attention_head_dim": [2, 4, 4],
        "block_out_channels": [32, 64, 64],
        "cross_attention_dim": 64,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 1],
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 64 + 6 * 16,
        "norm_num_groups": 8,
        "sample_size": 24,
    },
    vae=None,
    scheduler={
        **SDXL_SCHEDULER_CONFIG,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "beta_schedule": "squaredcos_cap_v2",
        "rescale_betas_zero_snr": True,
    },
    vlm={
        "vision_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 4,
        },
        "perceiver_config": dict(_TINY_VLM["perceiver_config"]),
        "text_config": {**_TINY_VLM["text_config"], "num_hidden_layers": 2},
    },
    tokens_per_image=16,
    resolution=24,
    num_inference_steps=20,
    guidance_scale=1.5,
    negative_pooled="keep",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (REAL, TINY, MINI)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}") from None


# ---------------------------------------------------------------------------------------------------
# Builders of random-init model folders (tiny and mini). The real model is never built here.


def make_byte_tokenizer():
    """A byte-level BPE tokenizer with no merges, made in code: any text tokenizes, deterministically.

    It carries Idefics2's special tokens so the encoder finds them by name, as in the real tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", FAKE_IMAGE_TOKEN, IMAGE_TOKEN, "<end_of_utterance>"]
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(byte_vocab))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<unk>",
        additional_special_tokens=[FAKE_IMAGE_TOKEN, IMAGE_TOKEN, "<end_of_utterance>"],
    )


def build_vlm_folder(preset: Preset, path: str | Path, seed: int = 0) -> Path:
    """Write a random-init Idefics2 folder (config, safetensors, tokenizer, preprocessor) for ``preset``."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    if preset.vlm is None:
        raise ValueError(f"preset {preset.name!r} uses pretrained VLM weights; there is nothing to build")
    path = Path(path)
    tokenizer = make_byte_tokenizer()
    cfg = json.loads(json.dumps(preset.vlm))
    cfg["text_config"]["vocab_size"] = len(tokenizer)
    cfg["image_token_id"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = Idefics2Config(**cfg)
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # The fields of Idefics2's preprocessor_config.json that the encoder reads.
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Idefics2ImageProcessor",
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "rescale_factor": 1 / 255,
                "do_image_splitting": False,
            },
            indent=2,
        )
    )
    return path


def build_unet(preset: Preset, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**preset.unet)


def build_vae(preset: Preset, seed: int = 0):
    if preset.vae is None:
        from .pixel_vae import PixelSpaceVAE

        return PixelSpaceVAE(channels=preset.unet["in_channels"])
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**preset.vae)


def build_sdxl_folder(preset: Preset, path: str | Path, seed: int = 0) -> Path:
    """Write a random-init diffusers-format SDXL folder (unet/, vae/, scheduler/) for ``preset``."""
    from diffusers import DDIMScheduler

    path = Path(path)
    build_unet(preset, seed).save_pretrained(path / "unet", safe_serialization=True)
    build_vae(preset, seed + 1).save_pretrained(path / "vae", safe_serialization=True)
    DDIMScheduler(**preset.scheduler).save_pretrained(path / "scheduler")
    return path
