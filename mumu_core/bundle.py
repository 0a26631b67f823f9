"""The MUMU weight bundle: connector + VLM LoRA + UNet LoRA + metadata in one ``.safetensors`` file.

Layout (docs/ARCHITECTURE.md, "Bundle"): tensors under ``connector.``, ``vlm_lora.`` and ``unet_lora.``;
metadata strings under ``mumu.*`` (JSON where structured). Also here: the UNet LoRA on its own in the
kohya format that ComfyUI's stock LoRA loaders and diffusers both read, and fusing it into an SDXL
checkpoint with peft's merge (never hand-written LoRA math).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .connector import ConnectorConfig, MumuConnector
from .presets import Preset, get_preset

FORMAT_VERSION = 1
# Written only by bundles trained with the perceiver resampler kept (Finding 1's ablation), so a reader
# that predates the switch refuses them instead of removing the perceiver; ordinary bundles stay format 1.
KEEP_PERCEIVER_FORMAT_VERSION = 2
READABLE_FORMAT_VERSION = 2
# Metadata fields newer than format 1: absent from older files, read as their defaults.
OPTIONAL_FIELDS = ("keep_perceiver",)
# Attention projections of SDXL's transformer blocks (self- and cross-attention), as in diffusers'
# SDXL LoRA training scripts.
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_ADAPTER = "mumu"
# The real Idefics2-8b tokenizer: Mistral's 32000 + <fake_token_around_image>, <image>, <end_of_utterance>.
IDEFICS2_8B_VOCAB = 32003

BUNDLE_HELP = (
    "a MUMU bundle: one .safetensors file with connector.*, vlm_lora.* and unet_lora.* tensors and mumu.* "
    "metadata, as written by `python -m train export` or mumu_core.bundle.save_bundle (it belongs in "
    "ComfyUI/models/mumu/)"
)
KOHYA_KEY_RE = re.compile(r"^lora_unet_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")


class BundleError(ValueError):
    """A missing, corrupt or not-a-bundle file; the message names the path and what belongs there."""


class BundleMismatchError(BundleError):
    """The bundle was made for another base VLM / UNet / connector; the message names both sides."""


@dataclass
class BundleMeta:
    preset: str
    base_vlm: dict  # {"name", "hidden_size", "vocab_size"}
    base_unet: dict  # {"name", "cross_attention_dim", "projection_class_embeddings_input_dim", "in_channels"}
    connector: ConnectorConfig
    vlm_lora: dict | None  # {"rank", "alpha", "targets"}
    unet_lora: dict | None  # {"rank", "alpha", "targets"}
    tokens_per_image: int
    hidden_state_layer: int
    negative_pooled: str
    prediction_type: str
    format_version: int = FORMAT_VERSION
    # The VLM's perceiver resampler stays in place (each image = its n_latents tokens), see MumuEncoder.
    keep_perceiver: bool = False

    def to_metadata(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in OPTIONAL_FIELDS and value == f.default:
                continue  # a default-valued new field is left out: the file is exactly format 1
            if isinstance(value, ConnectorConfig):
                value = asdict(value)
            out[f"mumu.{f.name}"] = json.dumps(value, sort_keys=True)
        if self.keep_perceiver:
            out["mumu.format_version"] = json.dumps(max(self.format_version, KEEP_PERCEIVER_FORMAT_VERSION))
        return out

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], path: Path | str = "<bundle>") -> BundleMeta:
        if "mumu.format_version" not in meta:
            raise BundleError(
                f"{path} is a safetensors file without mumu.* metadata, so not a MUMU bundle (a LoRA or a "
                f"checkpoint?). Expected {BUNDLE_HELP}."
            )
        try:
            values = {
                f.name: json.loads(meta[f"mumu.{f.name}"])
                for f in fields(cls)
                if f.name not in OPTIONAL_FIELDS or f"mumu.{f.name}" in meta
            }
        except KeyError as e:
            raise BundleError(
                f"{path} lacks the bundle metadata entry {e.args[0]!r}: the file is damaged"
            ) from e
        except json.JSONDecodeError as e:
            raise BundleError(f"{path} has unreadable bundle metadata ({e}): the file is damaged") from e
        if (
            not isinstance(values["format_version"], int)
            or values["format_version"] > READABLE_FORMAT_VERSION
        ):
            raise BundleError(
                f"{path} is bundle format {values['format_version']}, newer than this code reads "
                f"({READABLE_FORMAT_VERSION}): update ComfyUI-MUMU"
            )
        if not isinstance(values.get("keep_perceiver", False), bool):
            raise BundleError(
                f"{path} has an invalid mumu.keep_perceiver (not true/false): the file is damaged"
            )
        try:
            values["connector"] = ConnectorConfig(**values["connector"])
        except (TypeError, ValueError) as e:
            raise BundleError(f"{path} has an invalid connector config in its metadata ({e})") from e
        return cls(**values)


@dataclass
class MumuBundle:
    meta: BundleMeta
    connector_state: dict[str, Tensor]
    vlm_lora_state: dict[str, Tensor] = field(default_factory=dict)
    unet_lora_state: dict[str, Tensor] = field(default_factory=dict)


_PREFIXES = ("connector.", "vlm_lora.", "unet_lora.")


def save_bundle(bundle: MumuBundle, path: str | Path) -> Path:
    """Write ``bundle`` to ``path`` atomically (temp file in the same folder, then ``os.replace``)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise BundleError(f"bundle path {path} must end in .safetensors")
    _check_lora_meta(bundle)
    tensors: dict[str, Tensor] = {}
    for prefix, state in zip(
        _PREFIXES, (bundle.connector_state, bundle.vlm_lora_state, bundle.unet_lora_state)
    ):
        for k, v in state.items():
            # clone: safetensors refuses tensors that share storage (e.g. tied or sliced weights).
            tensors[prefix + k] = v.detach().to("cpu").contiguous().clone()
    return _atomic_save(save_file, tensors, path, bundle.meta.to_metadata())


def load_bundle(path: str | Path) -> MumuBundle:
    """Read a bundle (safetensors only), checking its metadata and connector tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist. Put {BUNDLE_HELP} there.")
    try:
        states: tuple[dict, dict, dict] = ({}, {}, {})
        with safe_open(str(path), framework="pt") as f:
            # Metadata first: a file without it is some other model, and that is the useful message.
            meta = BundleMeta.from_metadata(f.metadata() or {}, path)
            for k in f.keys():
                for state, prefix in zip(states, _PREFIXES):
                    if k.startswith(prefix):
                        state[k[len(prefix) :]] = f.get_tensor(k)
                        break
                else:
                    raise BundleError(
                        f"{path} holds tensor {k!r}, outside the bundle layout: not a MUMU bundle"
                    )
    except (SafetensorError, OSError) as e:
        raise BundleError(
            f"{path} cannot be read as safetensors ({e}): it is corrupt or not {BUNDLE_HELP}"
        ) from e
    for state, prefix in zip(states, _PREFIXES):
        for k, t in state.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise BundleError(
                    f"{path}: tensor {prefix}{k} holds NaN/inf values: the bundle is broken (e.g. saved "
                    "from a diverged run); export it again from the last good checkpoint"
                )
    bundle = MumuBundle(meta, *states)
    _check_connector_state(bundle, path)
    _check_lora_meta(bundle, path)
    return bundle


def _check_connector_state(bundle: MumuBundle, where: Any) -> None:
    with torch.device("meta"):
        expected = MumuConnector(bundle.meta.connector).state_dict()
    got = bundle.connector_state
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    shapes = [k for k in expected if k in got and tuple(got[k].shape) != tuple(expected[k].shape)]
    if missing or extra or shapes:
        raise BundleMismatchError(
            f"the connector weights in {where} do not match its recorded config {bundle.meta.connector} "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {shapes[:3]}): the file is damaged "
            "or was assembled from another connector"
        )


def _check_lora_meta(bundle: MumuBundle, where: Any = "the bundle") -> None:
    for name, state, meta in (
        ("vlm_lora", bundle.vlm_lora_state, bundle.meta.vlm_lora),
        ("unet_lora", bundle.unet_lora_state, bundle.meta.unet_lora),
    ):
        if state and not meta:
            raise BundleError(
                f"{where} has {name} tensors but no mumu.{name} metadata (rank, alpha, targets)"
            )
        if meta and not {"rank", "alpha", "targets"} <= set(meta):
            raise BundleError(f"{where}: mumu.{name} must give rank, alpha and targets, got {sorted(meta)}")


# -- building bundles --------------------------------------------------------------------------------


def lora_meta_of(model: torch.nn.Module, adapter: str | None = None) -> dict | None:
    """{"rank", "alpha", "targets"} of the (single) peft LoRA on ``model``, or None without one."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    if adapter is None:
        if len(configs) != 1:
            raise ValueError(f"model has adapters {sorted(configs)}; say which one goes in the bundle")
        adapter = next(iter(configs))
    cfg = configs[adapter]
    targets = cfg.target_modules
    targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "targets": targets}


def make_bundle(
    preset: Preset,
    connector: MumuConnector,
    encoder=None,
    unet=None,
    **meta_overrides: Any,
) -> MumuBundle:
    """A bundle from live modules. ``encoder`` (MumuEncoder) / ``unet`` contribute their LoRA if they
    have one, and their real shapes to the base description; without them the preset's shapes are used.
    """
    if encoder is not None:
        tcfg = encoder.vlm.config.text_config
        base_vlm = {"name": preset.vlm_name, "hidden_size": tcfg.hidden_size, "vocab_size": tcfg.vocab_size}
    else:
        base_vlm = {
            "name": preset.vlm_name,
            "hidden_size": connector.config.in_dim,
            "vocab_size": _preset_vocab(preset),
        }
    ucfg = dict(unet.config) if unet is not None else preset.unet
    base_unet = {
        "name": preset.unet_name,
        "cross_attention_dim": ucfg["cross_attention_dim"],
        "projection_class_embeddings_input_dim": ucfg["projection_class_embeddings_input_dim"],
        "in_channels": ucfg["in_channels"],
    }
    vlm_lora_state, vlm_lora = {}, None
    if encoder is not None and encoder.has_lora():
        vlm_lora_state = {k: v.detach().cpu() for k, v in encoder.lora_state_dict().items()}
        vlm_lora = lora_meta_of(encoder.vlm)
    unet_lora_state, unet_lora = {}, None
    if unet is not None and getattr(unet, "peft_config", None):
        from peft import get_peft_model_state_dict

        unet_lora = lora_meta_of(unet)
        adapter = next(iter(unet.peft_config))
        unet_lora_state = {
            k: v.detach().cpu() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()
        }
    meta = BundleMeta(
        preset=preset.name,
        base_vlm=base_vlm,
        base_unet=base_unet,
        connector=connector.config,
        vlm_lora=vlm_lora,
        unet_lora=unet_lora,
        tokens_per_image=preset.tokens_per_image,
        hidden_state_layer=encoder.hidden_state_layer if encoder is not None else preset.hidden_state_layer,
        negative_pooled=preset.negative_pooled,
        prediction_type=preset.scheduler.get("prediction_type", "epsilon"),
        keep_perceiver=bool(getattr(encoder, "keep_perceiver", False)),
    )
    for k, v in meta_overrides.items():
        if not hasattr(meta, k):
            raise TypeError(f"make_bundle: unknown metadata field {k!r}")
        setattr(meta, k, v)
    state = {k: v.detach().cpu() for k, v in connector.state_dict().items()}
    return MumuBundle(meta, state, vlm_lora_state, unet_lora_state)


def _preset_vocab(preset: Preset) -> int:
    if preset.vlm is None:
        return IDEFICS2_8B_VOCAB
    from .presets import make_byte_tokenizer

    return len(make_byte_tokenizer())


# -- UNet LoRA ---------------------------------------------------------------------------------------


def _unet_lora_config(rank: int, alpha: float, targets=None):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(targets or UNET_LORA_TARGETS)
    )


def add_unet_lora(unet, rank: int = 8, alpha: float = 8.0) -> None:
    """Attach a trainable peft LoRA (adapter ``default``) to SDXL's attention projections."""
    unet.add_adapter(_unet_lora_config(rank, alpha))


def apply_unet_lora(unet, bundle: MumuBundle, scale: float = 1.0) -> None:
    """Attach the bundle's UNet LoRA to a diffusers UNet at runtime (unfused), as adapter ``mumu``.

    Every key must land: a bundle for another UNet layout fails instead of loading half a LoRA.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not bundle.unet_lora_state:
        return
    check_unet_compatible(bundle, dict(unet.config))
    meta = bundle.meta.unet_lora
    if getattr(unet, "peft_config", None) and UNET_ADAPTER in unet.peft_config:
        unet.delete_adapters(UNET_ADAPTER)
    unet.add_adapter(
        _unet_lora_config(meta["rank"], meta["alpha"], meta["targets"]), adapter_name=UNET_ADAPTER
    )
    expected = get_peft_model_state_dict(unet, adapter_name=UNET_ADAPTER)
    got = bundle.unet_lora_state
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    shapes = [k for k in expected if k in got and got[k].shape != expected[k].shape]
    if missing or extra or shapes:
        unet.delete_adapters(UNET_ADAPTER)
        raise BundleMismatchError(
            f"the bundle's UNet LoRA does not fit this UNet (bundle for {bundle.meta.base_unet['name']}; "
            f"missing {missing[:2]}, unexpected {extra[:2]}, wrong shape {shapes[:2]}): use the SDXL the "
            "bundle was trained on"
        )
    param = next(unet.parameters())
    set_peft_model_state_dict(
        unet, {k: v.to(param.device, param.dtype) for k, v in got.items()}, adapter_name=UNET_ADAPTER
    )
    unet.set_adapters([UNET_ADAPTER], weights=[scale])


def check_unet_compatible(bundle: MumuBundle, unet_config: Mapping[str, Any]) -> None:
    """The UNet must be the one the bundle was made for: same context width, pooled + time-id width and
    input channels (the connector's outputs feed exactly these)."""
    base = bundle.meta.base_unet
    for key in ("cross_attention_dim", "projection_class_embeddings_input_dim", "in_channels"):
        if unet_config.get(key) != base.get(key):
            raise BundleMismatchError(
                f"the bundle was made for UNet {base.get('name')!r} with {key}={base.get(key)}, but this UNet "
                f"has {key}={unet_config.get(key)}: load the SDXL model the bundle was trained for"
            )
    if bundle.meta.connector.context_dim != base.get("cross_attention_dim"):
        raise BundleMismatchError(
            f"the bundle's connector gives {bundle.meta.connector.context_dim}-d context but its base UNet takes "
            f"{base.get('cross_attention_dim')}-d: the bundle is inconsistent (re-export it)"
        )


def check_vlm_compatible(bundle: MumuBundle, encoder) -> None:
    base = bundle.meta.base_vlm
    tcfg = encoder.vlm.config.text_config
    for key, have in (("hidden_size", tcfg.hidden_size), ("vocab_size", tcfg.vocab_size)):
        if base.get(key) != have:
            raise BundleMismatchError(
                f"the bundle was made for VLM {base.get('name')!r} with {key}={base.get(key)}, but the loaded VLM "
                f"has {key}={have}: load the VLM the bundle was trained for"
            )
    if bundle.meta.connector.in_dim != tcfg.hidden_size:
        raise BundleMismatchError(
            f"the bundle's connector reads {bundle.meta.connector.in_dim}-d VLM states but the VLM gives "
            f"{tcfg.hidden_size}-d"
        )


def load_conditioner(
    vlm_folder: str | Path,
    bundle: MumuBundle,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Encoder (with the bundle's VLM LoRA) + connector, checked against the bundle's base."""
    from peft import get_peft_model_state_dict

    from .conditioning import MumuConditioner
    from .encoder import VLM_FOLDER_HELP, EncoderLoadError, MumuEncoder

    try:
        encoder = MumuEncoder.from_pretrained(
            vlm_folder,
            dtype=dtype,
            hidden_state_layer=bundle.meta.hidden_state_layer,
            keep_perceiver=bundle.meta.keep_perceiver,
        )
    except EncoderLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        # transformers' messages for broken folders point at the Hub; name the local folder instead.
        raise EncoderLoadError(
            f"cannot load the VLM from {vlm_folder}: {e}. It must hold {VLM_FOLDER_HELP}."
        ) from e
    check_vlm_compatible(bundle, encoder)
    if bundle.vlm_lora_state:
        meta = bundle.meta.vlm_lora
        encoder.add_lora(meta["rank"], meta["alpha"])
        expected = get_peft_model_state_dict(encoder.vlm)
        got = bundle.vlm_lora_state
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        shapes = [k for k in expected if k in got and got[k].shape != expected[k].shape]
        if missing or extra or shapes:
            raise BundleMismatchError(
                f"the bundle's VLM LoRA does not fit the VLM in {vlm_folder} (bundle for "
                f"{bundle.meta.base_vlm['name']}; missing {missing[:2]}, unexpected {extra[:2]}, wrong shape "
                f"{shapes[:2]})"
            )
        encoder.load_lora_state_dict({k: v.to(dtype) for k, v in got.items()}, meta["rank"], meta["alpha"])
        # Folding the LoRA in makes inference cost the same as the base VLM.
        encoder.merge_lora()
    connector = MumuConnector(bundle.meta.connector)
    connector.load_state_dict(bundle.connector_state, strict=True)
    connector.to(dtype)
    return MumuConditioner(encoder, connector).to(device).eval()


# -- kohya export ------------------------------------------------------------------------------------


def kohya_unet_lora(bundle: MumuBundle) -> dict[str, Tensor]:
    """The UNet LoRA under kohya keys: ``lora_unet_<diffusers module path, dots as _>.lora_down.weight``,
    ``.lora_up.weight`` and ``.alpha``. ComfyUI maps these names onto SDXL (it rejects peft-style
    attention keys), and diffusers' ``load_lora_weights`` converts them back.
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    if not bundle.unet_lora_state:
        raise BundleError("the bundle has no UNet LoRA to export (it was trained with the UNet frozen)")
    sd = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in bundle.unet_lora_state.items()})
    # diffusers writes alpha = rank; the bundle's alpha may differ, and alpha/rank is the LoRA's scale.
    alpha = float(bundle.meta.unet_lora["alpha"])
    out = {}
    for k, v in sd.items():
        if not KOHYA_KEY_RE.match(k):
            raise AssertionError(f"kohya conversion produced an unexpected key {k!r}")
        out[k] = torch.tensor(alpha, dtype=torch.float32) if k.endswith(".alpha") else v.contiguous()
    return out


def export_kohya_unet_lora(bundle: MumuBundle, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    meta = bundle.meta
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(meta.unet_lora["rank"]) if meta.unet_lora else "0",
        "ss_network_alpha": str(meta.unet_lora["alpha"]) if meta.unet_lora else "0",
        "ss_base_model_version": "sdxl_base_v1-0" if meta.preset == "real" else f"mumu_{meta.preset}",
        "mumu.base_unet": json.dumps(meta.base_unet, sort_keys=True),
        "mumu.note": "UNet LoRA of a MUMU bundle; it needs MUMU conditioning, not CLIP text",
    }
    return _atomic_save(save_file, kohya_unet_lora(bundle), path, metadata)


def current_umask() -> int:
    """The process umask; read from /proc where possible (os.umask() to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def apply_umask(path: str | Path, directory: bool = False) -> None:
    """Give ``path`` the permissions a plain ``open()`` / ``mkdir`` would (0666 / 0777 minus the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def apply_umask_tree(root: str | Path) -> None:
    """:func:`apply_umask` on a folder and everything below it: mkdtemp (0700), safetensors and diffusers
    (0600) leave written models private, and a ComfyUI service running as another user must read them."""
    root = Path(root)
    for p in [root, *root.rglob("*")]:
        apply_umask(p, directory=p.is_dir())


def _atomic_save(save_file, tensors: dict, path: Path, metadata: dict[str, str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        # After writing: safetensors (like mkstemp) leaves the file private (0600), and a model file
        # must be readable by, e.g., a ComfyUI service running as another user, as the umask allows.
        apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# -- fusing into checkpoints -------------------------------------------------------------------------


def fuse_unet_lora_into_checkpoint(
    bundle: MumuBundle, sdxl_path: str | Path, out_path: str | Path, scale: float = 1.0
) -> Path:
    """Merge the bundle's UNet LoRA into an SDXL checkpoint and write one single-file checkpoint.

    ``sdxl_path`` is a single ``.safetensors`` in the original layout (every non-UNet tensor, e.g. VAE and
    text encoders, is copied unchanged) or a diffusers folder (the output holds its UNet and VAE). The
    merge is peft's (diffusers ``fuse_lora``), done in float32 and cast back to each tensor's dtype.
    """
    from safetensors.torch import save_file

    from .sdxl import (
        SDXLLoadError,
        components_to_ldm,
        instantiate_from_state,
        ldm_names_by_identity,
        ldm_to_diffusers_unet,
        load_sdxl,
        read_checkpoint,
        split_unet,
    )

    if not bundle.unet_lora_state:
        raise BundleError("the bundle has no UNet LoRA: there is nothing to fuse")
    preset = get_preset(bundle.meta.preset)
    sdxl_path, out_path = Path(sdxl_path), Path(out_path)
    if sdxl_path.is_dir() and out_path.suffix == "":
        return _fuse_into_folder(bundle, sdxl_path, out_path, scale)
    if out_path.suffix != ".safetensors":
        raise BundleError(
            f"output {out_path} must end in .safetensors (or, for a diffusers folder input, be a folder name)"
        )
    if out_path.resolve() == sdxl_path.resolve():
        raise BundleError("refusing to overwrite the input checkpoint: give another output path")
    if not sdxl_path.exists():
        raise SDXLLoadError(f"SDXL path {sdxl_path} does not exist")

    if sdxl_path.is_dir():
        comps = load_sdxl(sdxl_path, preset, dtype=torch.float32)
        _fuse(comps.unet, bundle, scale)
        tensors, metadata = components_to_ldm(comps.unet, comps.vae), {}
    else:
        tensors, metadata = read_checkpoint(sdxl_path)
        unet_ldm = split_unet(tensors, sdxl_path)
        unet_sd = ldm_to_diffusers_unet(unet_ldm, preset.unet)
        names = ldm_names_by_identity(unet_ldm, unet_sd)
        unet = instantiate_from_state("UNet2DConditionModel", preset.unet, unet_sd, torch.float32, sdxl_path)
        _fuse(unet, bundle, scale)
        fused = unet.state_dict()
        if set(fused) != set(names):
            raise AssertionError(
                "fusing changed the UNet's parameter names; refusing to write a partial file"
            )
        tensors = dict(tensors)
        for k, ldm_key in names.items():
            tensors[ldm_key] = fused[k].to(tensors[ldm_key].dtype).contiguous()
    metadata = dict(metadata)
    metadata.update(
        {
            "mumu.fused_unet_lora": json.dumps(
                {**(bundle.meta.unet_lora or {}), "scale": scale}, sort_keys=True
            ),
            "mumu.base_unet": json.dumps(bundle.meta.base_unet, sort_keys=True),
        }
    )
    return _atomic_save(save_file, tensors, out_path, metadata)


def _fuse_into_folder(bundle: MumuBundle, sdxl_dir: Path, out_dir: Path, scale: float) -> Path:
    """Diffusers folder in, diffusers folder out: a copy whose ``unet/`` has the LoRA merged in.

    Everything else in the folder (VAE, scheduler, text encoders, tokenizers) is copied unchanged; the
    merge is the same peft merge as for single files. Written beside ``out_dir`` and renamed into place.
    """
    import shutil

    from .sdxl import load_sdxl

    if out_dir.resolve() == sdxl_dir.resolve() or sdxl_dir.resolve() in out_dir.resolve().parents:
        raise BundleError(
            f"refusing to write {out_dir} inside the input folder {sdxl_dir}: give another path"
        )
    if out_dir.exists():
        raise BundleError(f"output folder {out_dir} exists: give a new folder name (nothing is overwritten)")
    comps = load_sdxl(sdxl_dir, get_preset(bundle.meta.preset), dtype=torch.float32)
    _fuse(comps.unet, bundle, scale)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        shutil.copytree(sdxl_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        comps.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        (tmp / "mumu_fused.json").write_text(
            json.dumps(
                {**(bundle.meta.unet_lora or {}), "scale": scale, "base": str(sdxl_dir)}, sort_keys=True
            )
        )
        apply_umask_tree(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _fuse(unet, bundle: MumuBundle, scale: float) -> None:
    apply_unet_lora(unet, bundle, scale)
    unet.fuse_lora(adapter_names=[UNET_ADAPTER])
    unet.unload_lora()
