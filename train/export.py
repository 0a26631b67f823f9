"""Exports written at every save: the MUMU bundle, the kohya UNet LoRA, and full-weight folders.

Every rank calls :func:`export`; the sharded tensors are gathered (``DTensor.full_tensor``, a
collective) and rank 0 writes ``out_dir/export/step_N/``:
- ``mumu.safetensors``: the bundle in the core's format (mumu_core.bundle.save_bundle);
- ``unet_lora_kohya.safetensors``: when the UNet trains with LoRA;
- ``vlm/``: when the vision tower or the language model trains fully, an Idefics2 folder: the base folder
  copied with its safetensors rewritten with the trained tensors (same keys, so perceiver and lm_head
  stay present and loading is warning-free);
- ``sdxl/``: when the UNet trains fully, a diffusers folder unet/ + vae/ + scheduler/.
With EMA on, the trained tensors in all of these are the EMA weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .model import Built, trainable_named


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", torch.float32)


def gather_state(
    model: nn.Module, ema: dict[str, torch.Tensor], prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Full tensors on rank 0 (empty elsewhere) of every trainable parameter and of every parameter
    under ``prefixes``; EMA values replace trainable ones when EMA is on. Collective."""
    rank = dist.get_rank()
    trainable = {n for n, _ in trainable_named(model)}
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if name not in trainable and not name.startswith(prefixes):
            continue
        t = _full(ema[name] if name in ema else p)
        if rank == 0:
            out[name] = t
    return out


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export(
    built: Built,
    out: Path,
    ema: dict[str, torch.Tensor],
    cfg: Any,
    tokens_per_image: int,
    prediction_type: str,
) -> Path | None:
    """Write the exports of the current weights. Returns the folder on rank 0, None elsewhere."""
    from mumu_core.bundle import apply_umask_tree, export_kohya_unet_lora, make_bundle, save_bundle
    from mumu_core.connector import MumuConnector

    model = built.model
    parts = cfg.parts
    full_vlm = parts.vision.mode == "full" or parts.vlm.mode == "full"
    full_unet = parts.unet.mode == "full"
    prefixes = ("connector.",) + (("encoder.vlm.",) if full_vlm else ()) + (("unet.",) if full_unet else ())
    state = gather_state(model, ema, prefixes)
    if dist.get_rank() != 0:
        dist.barrier()
        return None
    try:
        # Written beside the destination and renamed into place: a killed export leaves no partial folder.
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        connector = MumuConnector(built.preset.connector)
        connector.load_state_dict(_strip(state, "connector."), strict=True)
        tcfg = model.encoder.vlm.config.text_config
        bundle = make_bundle(
            built.preset,
            connector,
            base_vlm={
                "name": built.preset.vlm_name,
                "hidden_size": tcfg.hidden_size,
                "vocab_size": tcfg.vocab_size,
            },
            tokens_per_image=tokens_per_image,
            prediction_type=prediction_type,
            hidden_state_layer=model.encoder.hidden_state_layer,
            keep_perceiver=model.encoder.keep_perceiver,
        )
        for part, module, prefix in (
            ("vlm", model.encoder.vlm, "encoder.vlm."),
            ("unet", model.unet, "unet."),
        ):
            if part in built.frozen_lora_state:
                lora_state = built.frozen_lora_state[part]
            elif getattr(parts, part).mode == "lora":
                from peft import get_peft_model_state_dict

                rel = {k: v for k, v in _strip(state, prefix).items() if "lora_" in k}
                lora_state = get_peft_model_state_dict(
                    module, state_dict=rel, adapter_name=built.adapter[part]
                )
            else:
                continue
            if part == "vlm":
                bundle.vlm_lora_state, bundle.meta.vlm_lora = lora_state, built.lora["vlm"]
            else:
                bundle.unet_lora_state, bundle.meta.unet_lora = lora_state, built.lora["unet"]
        save_bundle(bundle, tmp / "mumu.safetensors")
        if bundle.unet_lora_state and parts.unet.mode == "lora":
            export_kohya_unet_lora(bundle, tmp / "unet_lora_kohya.safetensors")
        if full_vlm:
            write_vlm_folder(Path(cfg.model.vlm), _strip(state, "encoder.vlm."), tmp / "vlm")
        if full_unet:
            write_sdxl_folder(built, _strip(state, "unet."), tmp / "sdxl")
        apply_umask_tree(tmp)  # mkdtemp / safetensors leave it private
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        dist.barrier()
    return out


def write_vlm_folder(base: Path, trained: dict[str, torch.Tensor], dest: Path) -> None:
    """Copy the base Idefics2 folder, rewriting its safetensors with ``trained`` (names relative to the
    Idefics2Model, i.e. without the ``model.`` prefix of the file's keys)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    landed: set[str] = set()
    files = sorted(base.glob("*.safetensors"))
    for f in files:
        tensors = {}
        with safe_open(str(f), framework="pt") as src:
            meta = src.metadata() or {"format": "pt"}
            for key in src.keys():
                t = src.get_tensor(key)
                name = (
                    key[len("model.") :]
                    if key.startswith("model.") and key[len("model.") :] in trained
                    else key
                )
                if name in trained:
                    t = trained[name].to(t.dtype)
                    landed.add(name)
                tensors[key] = t.contiguous()
        save_file(tensors, str(dest / f.name), metadata=meta)
    missing = sorted(set(trained) - landed)
    if missing:
        raise RuntimeError(
            f"{len(missing)} trained VLM tensors have no key in {base}'s safetensors (e.g. {missing[:3]}): "
            "the base folder does not match the trained model"
        )


def write_sdxl_folder(built: Built, unet_state: dict[str, torch.Tensor], dest: Path) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(built.model.unet.config)
    unet.load_state_dict(unet_state, strict=True)
    unet.save_pretrained(dest / "unet", safe_serialization=True)
    dtype = next(iter(built.vae.state_dict().values())).dtype
    built.vae.to(torch.float32).save_pretrained(dest / "vae", safe_serialization=True)
    built.vae.to(dtype)
    built.scheduler.save_pretrained(dest / "scheduler")
    (dest / "README.txt").write_text(
        json.dumps({"note": "diffusers SDXL folder written by python -m train (full UNet training)"})
    )


def export_checkpoint(run_dir: Path, step: int | None = None, dest: Path | None = None) -> Path:
    """``python -m train export``: re-export a checkpoint of ``run_dir`` (newest, or ``step``).

    The run's own config (kept in the checkpoint) rebuilds the model; any number of processes may do
    it (DCP reshards). Useful after a hard kill between saves, or to export into another folder.
    """
    from mumu_core.presets import get_preset

    from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_trainer, step_dir
    from .config import TrainConfig, from_dict
    from .data import Rules
    from .loop import distributed
    from .model import build_model, param_groups, shard_model

    root = Path(run_dir) / "checkpoints"
    path = step_dir(root, step) if step is not None else latest_checkpoint(root)
    if path is None or not (path / "trainer.json").is_file():
        raise FileNotFoundError(
            f"no complete checkpoint {'step ' + str(step) if step is not None else ''} in {root}: "
            "give the out_dir of a training run (it holds checkpoints/step_N/)"
        )
    trainer = read_trainer(path)  # refuses formats that would need pickle, before anything loads
    try:
        cfg = from_dict(TrainConfig, trainer["config"], "")
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}/trainer.json holds no usable config ({e})") from None
    dest = Path(dest) if dest is not None else Path(run_dir) / "export" / path.name
    check_export_dest(dest, Path(run_dir))
    preset = get_preset(cfg.model.preset)
    rules = Rules.from_config(cfg.data, preset.tokens_per_image, preset.resolution)
    with distributed() as (device, rank, world):
        built = build_model(cfg, preset, device, print if rank == 0 else (lambda _m: None))
        shard_model(built.model, cfg, device)
        optimizer = torch.optim.AdamW(param_groups(built.model, cfg))
        ema = {n: p.detach().clone() for n, p in trainable_named(built.model)} if cfg.diffusion.ema else {}
        load_checkpoint(path, built.model, optimizer, ema, weights_only=True)
        export(built, dest, ema, cfg, rules.tokens, trainer["prediction_type"])
    return dest


def check_export_dest(dest: Path, run_dir: Path) -> None:
    """An export replaces ``dest`` as a whole, so it must be new, empty or an earlier export, and
    never the run folder, its checkpoints, or a folder above them."""
    from .checkpoint import CheckpointError
    from .loop import check_writable_dir

    d, run = dest.resolve(), run_dir.resolve()
    protected = (run, run / "checkpoints")
    if any(d == p or d in p.parents for p in protected) or (run / "checkpoints") in d.parents:
        raise CheckpointError(
            f"--dest {dest} would replace the run folder {run_dir} or its checkpoints: give a new folder"
        )
    if dest.exists():
        if not dest.is_dir():
            raise CheckpointError(f"--dest {dest} is a file: give a folder")
        if any(dest.iterdir()) and not (dest / "mumu.safetensors").is_file():
            raise CheckpointError(
                f"--dest {dest} exists and is not an earlier export (no mumu.safetensors); an export "
                "replaces its destination as a whole: give a new or empty folder"
            )
    check_writable_dir(dest.parent, "--dest's parent")
