"""Offline SDXL loading (single ``.safetensors`` file or diffusers folder) and the layout converters.

diffusers' ``from_single_file`` looks up a config on the Hub; MUMU must work without a network, so a
single-file checkpoint is converted here with diffusers' own converters
(``single_file_utils.convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``) against the
preset's config, and loaded into the same ``UNet2DConditionModel`` / ``AutoencoderKL`` classes.

The reverse direction (diffusers names -> original "ldm" names) is needed to write single-file
checkpoints (fused LoRA, test fixtures). It is a key map written here, and every use checks it against
diffusers' forward converter: converting the written file back must give exactly the diffusers key set,
with every tensor where it came from. A wrong map cannot silently write a broken checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .presets import Preset

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

SDXL_PATH_HELP = (
    "an SDXL checkpoint: either one .safetensors file in the original (ldm/sgm) layout, as on Civitai or "
    "stabilityai/stable-diffusion-xl-base-1.0/sd_xl_base_1.0.safetensors, or a diffusers folder with "
    "unet/ (config.json + diffusion_pytorch_model.safetensors) and vae/"
)


class SDXLLoadError(ValueError):
    """The SDXL path is missing or holds something else; the message says what belongs there."""


@dataclass
class SDXLComponents:
    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL or mumu_core.pixel_vae.PixelSpaceVAE
    scheduler: Any  # diffusers.DDIMScheduler


def make_scheduler(preset: Preset):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**preset.scheduler)


def load_sdxl(
    path: str | Path, preset: Preset, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SDXLComponents:
    """Load SDXL's UNet and VAE from ``path`` (file or diffusers folder) without any network access.

    The scheduler is always the preset's DDIM (the paper's sampler), whatever the folder carries.
    """
    path = Path(path)
    if not path.exists():
        raise SDXLLoadError(f"SDXL path {path} does not exist. Put {SDXL_PATH_HELP} there.")
    if path.is_dir():
        try:
            unet, vae = _load_diffusers_folder(path, preset, dtype)
        except SDXLLoadError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            # diffusers' own messages for broken folders talk about the Hub; name the folder instead.
            raise SDXLLoadError(
                f"cannot load the diffusers SDXL folder {path}: {e}. It must be {SDXL_PATH_HELP}."
            ) from e
    else:
        unet, vae = _load_single_file(path, preset, dtype)
    check_unet_config(unet.config, preset, str(path))
    return SDXLComponents(unet.to(device).eval(), vae.to(device).eval(), make_scheduler(preset))


def check_unet_config(config: Mapping[str, Any], preset: Preset, where: str) -> None:
    """The UNet must take the preset's context width and pooled + time-id width."""
    for key in ("cross_attention_dim", "projection_class_embeddings_input_dim", "in_channels"):
        if config.get(key) != preset.unet[key]:
            raise SDXLLoadError(
                f"the UNet in {where} has {key}={config.get(key)} but preset {preset.name!r} needs "
                f"{preset.unet[key]}: it is not the SDXL the preset was made for (pick the right --preset, "
                "or give an SDXL-base-compatible checkpoint)"
            )


# -- diffusers folders ------------------------------------------------------------------------------


def _load_diffusers_folder(path: Path, preset: Preset, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet_dir, vae_dir = path / "unet", path / "vae"
    for sub in (unet_dir, vae_dir):
        if not (sub / "config.json").is_file():
            raise SDXLLoadError(
                f"diffusers folder {path} lacks {sub.name}/config.json. It must be {SDXL_PATH_HELP}."
            )
    unet = UNet2DConditionModel.from_pretrained(
        unet_dir, torch_dtype=dtype, use_safetensors=True, variant=_variant(unet_dir)
    )
    vae_cls_name = json.loads((vae_dir / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    if vae_cls_name == "PixelSpaceVAE":
        from .pixel_vae import PixelSpaceVAE

        vae = PixelSpaceVAE.from_pretrained(vae_dir, torch_dtype=dtype, use_safetensors=True)
    elif vae_cls_name == "AutoencoderKL":
        vae = AutoencoderKL.from_pretrained(
            vae_dir, torch_dtype=dtype, use_safetensors=True, variant=_variant(vae_dir)
        )
    else:
        raise SDXLLoadError(
            f"{vae_dir}/config.json names VAE class {vae_cls_name!r}; only AutoencoderKL and PixelSpaceVAE load"
        )
    return unet, vae


def _variant(sub: Path) -> str | None:
    """diffusers picks ``*.safetensors``; SDXL repos may ship only the ``.fp16`` variant."""
    if any(p.name.endswith(".safetensors") and ".fp16." not in p.name for p in sub.iterdir()):
        return None
    if any(p.name.endswith(".fp16.safetensors") for p in sub.iterdir()):
        return "fp16"
    raise SDXLLoadError(
        f"{sub} has no .safetensors weights (pickled .bin files are never loaded): "
        "convert them to safetensors or use the repo's safetensors files"
    )


# -- single files -----------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a single-file checkpoint (safetensors only)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":
        raise SDXLLoadError(
            f"{path} is not a .safetensors file: only safetensors checkpoints load (pickled .ckpt/.pt "
            "files can run code); convert it first"
        )
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise SDXLLoadError(
            f"cannot read {path} as safetensors ({e}): the file is corrupt or truncated"
        ) from e
    return tensors, meta


def split_unet(checkpoint: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """The UNet's tensors with the ldm prefix kept, after checking the file is an SDXL checkpoint."""
    unet = {k: v for k, v in checkpoint.items() if k.startswith(LDM_UNET_PREFIX)}
    if not unet:
        raise SDXLLoadError(
            f"{path} has no '{LDM_UNET_PREFIX}*' tensors: it is not a Stable Diffusion checkpoint in the "
            f"original layout (a LoRA, a VAE or a diffusers-format file?). Give {SDXL_PATH_HELP}."
        )
    if LDM_UNET_PREFIX + "label_emb.0.0.weight" not in unet:
        raise SDXLLoadError(
            f"{path} is a Stable Diffusion checkpoint but not SDXL (no label_emb, the SDXL size/pooled "
            "embedding): SD 1.x/2.x checkpoints cannot be used with MUMU. Give an SDXL base checkpoint."
        )
    return unet


def ldm_to_diffusers_unet(unet_ldm: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with _quiet_diffusers():
        return convert_ldm_unet_checkpoint(dict(unet_ldm), dict(config))


def ldm_to_diffusers_vae(vae_ldm: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    with _quiet_diffusers():
        return convert_ldm_vae_checkpoint(dict(vae_ldm), dict(config))


def _load_single_file(path: Path, preset: Preset, dtype: torch.dtype):
    checkpoint, _ = read_checkpoint(path)
    unet_sd = ldm_to_diffusers_unet(split_unet(checkpoint, path), preset.unet)
    unet = instantiate_from_state("UNet2DConditionModel", preset.unet, unet_sd, dtype, path)
    if preset.vae is None:
        from .pixel_vae import PixelSpaceVAE

        vae = PixelSpaceVAE(channels=preset.unet["in_channels"]).to(dtype)
    else:
        vae_ldm = {k: v for k, v in checkpoint.items() if k.startswith(LDM_VAE_PREFIX)}
        if not vae_ldm:
            raise SDXLLoadError(
                f"{path} has no VAE ('{LDM_VAE_PREFIX}*' tensors): use a full SDXL checkpoint that bundles "
                "its VAE, or a diffusers folder with vae/"
            )
        vae_sd = ldm_to_diffusers_vae(vae_ldm, preset.vae)
        vae = instantiate_from_state("AutoencoderKL", preset.vae, vae_sd, dtype, path)
    return unet, vae


def instantiate_from_state(
    cls_name: str, config: Mapping[str, Any], state: dict, dtype: torch.dtype, path: Path
):
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls(**config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{name}: {len(keys)} e.g. {keys[:2]}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        raise SDXLLoadError(
            f"the {cls_name} weights in {path} do not fit the preset's SDXL config ({detail}): it is not an "
            "SDXL base checkpoint of that size (refiner, SD 1.x/2.x or a pruned file?)"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


@contextlib.contextmanager
def _quiet_diffusers():
    # The converters warn about EMA weights on every SDXL file; that is noise for a user.
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(level)


class _DropTorchvisionFallbackNotes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


def sdxl_pipeline_class() -> type:
    """diffusers' ``StableDiffusionXLPipeline`` class, imported without transformers' torchvision notes.

    Importing that module imports ``CLIPImageProcessor`` (its ``feature_extractor``) and, through
    diffusers' pipeline package, ``SiglipImageProcessor``; without torchvision (this project's venv)
    transformers then warns that it falls back to their PIL variants. MUMU leaves those slots empty and
    does its own image preprocessing (mumu_core.encoder), so the notes name nothing that runs: only they
    are dropped, and only during this import.
    """
    note_logger = logging.getLogger("transformers.utils.import_utils")
    note_filter = _DropTorchvisionFallbackNotes()
    note_logger.addFilter(note_filter)
    try:
        from diffusers import StableDiffusionXLPipeline
    finally:
        note_logger.removeFilter(note_filter)
    return StableDiffusionXLPipeline


# -- diffusers -> ldm (writing single files) -------------------------------------------------------

_UNET_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _unet_prefix_map(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(diffusers prefix, ldm prefix) pairs of the blocks, from the block layout in ``config``."""
    levels, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-level layers_per_block is not an SDXL layout")
    pairs = []
    for i in range(levels):
        for j in range(lpb):
            n = 1 + (lpb + 1) * i + j
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.")]
            pairs += [(f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.")]
        if i < levels - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(lpb + 1) * (i + 1)}.0.op.")]
        has_attn = "CrossAttn" in config["up_block_types"][i]
        for j in range(lpb + 1):
            n = (lpb + 1) * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.")]
            pairs += [(f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.")]
        if i < levels - 1:
            n = (lpb + 1) * i + lpb
            pairs += [(f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n}.{2 if has_attn else 1}.")]
    pairs += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1.")]
    pairs += [("mid_block.resnets.1.", "middle_block.2.")]
    return pairs


def diffusers_to_ldm_unet(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """diffusers UNet state dict -> single-file keys (``model.diffusion_model.`` + ldm name), verified."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    top.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    prefixes = _unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        if key in top:
            out[LDM_UNET_PREFIX + top[key]] = value
            continue
        for d, ldm in prefixes:
            if key.startswith(d):
                rest = key[len(d) :]
                if ".resnets." in d:
                    for a, b in _UNET_RESNET:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                out[LDM_UNET_PREFIX + ldm + rest] = value
                break
        else:
            raise ValueError(f"no ldm name for diffusers UNet key {key!r}")
    _verify_inverse(out, state, lambda sd: ldm_to_diffusers_unet(sd, config), "UNet")
    return out


def diffusers_to_ldm_vae(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict:
    """diffusers AutoencoderKL state dict -> single-file keys (``first_stage_model.`` + ldm name), verified."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
    levels = len(config["block_out_channels"])
    prefixes = []
    for i in range(levels):
        prefixes += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")]
        prefixes += [(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")]
        prefixes += [(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")]
        prefixes += [(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")]
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.") for j in range(2)]
        prefixes += [(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]
    out = {}
    for key, value in state.items():
        if key in top:
            out[LDM_VAE_PREFIX + top[key]] = value
            continue
        for d, ldm in prefixes:
            if key.startswith(d):
                rest = key[len(d) :].replace("conv_shortcut", "nin_shortcut")
                if ".attentions." in d:
                    for a, b in _VAE_ATTN:
                        if rest.startswith(a + "."):
                            rest = b + rest[len(a) :]
                            break
                    # ldm's VAE attention projections are 1x1 convolutions.
                    if value.ndim == 2:
                        value = value[:, :, None, None]
                out[LDM_VAE_PREFIX + ldm + rest] = value
                break
        else:
            raise ValueError(f"no ldm name for diffusers VAE key {key!r}")

    def forward(sd):
        return ldm_to_diffusers_vae(sd, config)

    _verify_inverse(out, state, forward, "VAE")
    return out


def _verify_inverse(ldm: dict, diffusers_sd: Mapping[str, torch.Tensor], forward, what: str) -> None:
    back = forward(ldm)
    if set(back) != set(diffusers_sd):
        raise AssertionError(
            f"{what} diffusers->ldm map does not invert diffusers' converter: "
            f"{sorted(set(back) ^ set(diffusers_sd))[:4]}"
        )
    for k, v in back.items():
        # The converter renames (and for VAE attention reshapes: a view, whose _base is the original).
        if not (v is diffusers_sd[k] or v._base is diffusers_sd[k]):
            raise AssertionError(f"{what} diffusers->ldm map sends {k!r} to the wrong ldm key")


def ldm_names_by_identity(
    unet_ldm: Mapping[str, torch.Tensor], unet_diffusers: Mapping[str, torch.Tensor]
) -> dict[str, str]:
    """diffusers key -> ldm key, from the converter handing back the very tensor objects it was given.

    ``convert_ldm_unet_checkpoint`` only renames for SDXL (no reshapes), so each converted tensor is one
    of the input tensors; matching by identity inverts it without a hand-written map. Every key must map
    one to one, or this raises.
    """
    by_id = {id(v): k for k, v in unet_ldm.items()}
    if len(by_id) != len(unet_ldm):
        raise ValueError(
            "the checkpoint's UNet tensors are not distinct objects; cannot invert the converter"
        )
    names = {}
    for k, v in unet_diffusers.items():
        if id(v) not in by_id:
            raise ValueError(f"diffusers UNet key {k!r} is not a renamed checkpoint tensor")
        names[k] = by_id[id(v)]
    unused = set(unet_ldm) - set(names.values())
    if unused or len(set(names.values())) != len(names):
        raise ValueError(
            f"the UNet key map is not one to one ({len(unused)} checkpoint tensors unused, e.g. "
            f"{sorted(unused)[:3]}): the checkpoint has tensors the SDXL config does not know"
        )
    return names


def components_to_ldm(unet, vae) -> dict[str, torch.Tensor]:
    """One single-file state dict (prefixed ldm keys) from a diffusers UNet and VAE.

    A ``PixelSpaceVAE`` has no weights to write; such a file holds the UNet only.
    """
    out = diffusers_to_ldm_unet(unet.state_dict(), unet.config)
    if type(vae).__name__ == "AutoencoderKL":
        out.update(diffusers_to_ldm_vae(vae.state_dict(), vae.config))
    return {k: v.detach().contiguous() for k, v in out.items()}
