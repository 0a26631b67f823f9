"""Building the trainable MUMU model: load the parts, set per-part modes, shard with FSDP2.

Everything the loss needs runs inside :meth:`TrainModel.forward`, so FSDP2's root hooks (unshard of
the root group, mixed-precision casts) wrap every use; ``op`` selects the training loss or the two
sampling operations. Sub-units are sharded per transformer block (connector ``ConnectorBlock``s, the
language model's decoder layers) and per UNet block; the vision tower, embeddings and the small UNet
stems stay in the root group. That placement matters: the vision tower runs a data-dependent number of
times per step (one call per distinct image size), and a separately sharded module must run the same
number of times on every rank or its all-gathers would deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mumu_core.conditioning import SDXLConditioning, apply_image_weights, drop_conditioning
from mumu_core.connector import MumuConnector
from mumu_core.encoder import MumuEncoder
from mumu_core.presets import Preset
from mumu_core.prompt import InterleavedPrompt

from .config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PARTS = ("vision", "vlm", "connector", "unet")


class TrainModel(nn.Module):
    """Encoder + connector + UNet; one forward for the loss, conditioning or one denoising call."""

    def __init__(self, encoder: MumuEncoder, connector: MumuConnector, unet: nn.Module, negative_pooled: str):
        super().__init__()
        self.encoder = encoder
        self.connector = connector
        self.unet = unet
        self.negative_pooled = negative_pooled

    def forward(self, op: str, **kw: Any) -> Any:
        if op == "loss":
            return self.predict(**kw)
        if op == "encode":
            return self.condition(kw["prompts"])
        if op == "denoise":
            return self.denoise(kw["latents"], kw["timesteps"], kw["cond"], kw["time_ids"])
        raise ValueError(f"unknown op {op!r}")

    def condition(self, prompts: list[InterleavedPrompt]) -> SDXLConditioning:
        enc = self.encoder(prompts)
        dtype = self.connector.proj_in.weight.dtype
        context, pooled = self.connector(enc.hidden_states.to(dtype), enc.attention_mask)
        context = apply_image_weights(context, enc.image_index, prompts)
        return SDXLConditioning(context, pooled, enc.attention_mask)

    def denoise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SDXLConditioning, time_ids: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        # The padding mask keeps a padded batch equal to the unpadded prompts that inference sees.
        return self.unet(
            latents.to(dtype),
            timesteps,
            encoder_hidden_states=cond.context.to(dtype),
            encoder_attention_mask=cond.attention_mask,
            added_cond_kwargs={"text_embeds": cond.pooled.to(dtype), "time_ids": time_ids.to(dtype)},
        ).sample

    def predict(
        self,
        prompts: list[InterleavedPrompt],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        time_ids: torch.Tensor,
        drop: torch.Tensor,
    ) -> torch.Tensor:
        cond = drop_conditioning(self.condition(prompts), drop, self.negative_pooled)
        return self.denoise(noisy, timesteps, cond, time_ids)


@dataclass
class Built:
    model: TrainModel
    vae: nn.Module
    scheduler: Any  # diffusers DDIMScheduler (the preset's schedule)
    preset: Preset
    lora: dict[str, dict | None]  # part -> {"rank", "alpha", "targets"} of its LoRA (vlm, unet)
    adapter: dict[str, str]  # part -> peft adapter name
    frozen_lora_state: dict[str, dict[str, torch.Tensor]]  # LoRAs from init_bundle kept frozen
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # EMA of the trainable params (sharded)


def part_of(name: str) -> str:
    """Which configured part a parameter of TrainModel belongs to."""
    if name.startswith("encoder.vlm.vision_model."):
        return "vision"
    if name.startswith("encoder."):
        return "vlm"
    if name.startswith("connector."):
        return "connector"
    if name.startswith("unet."):
        return "unet"
    raise ValueError(f"parameter {name} belongs to no part")


def build_model(cfg: TrainConfig, preset: Preset, device: torch.device, log=print) -> Built:
    """Load the VLM and SDXL from local paths, attach LoRAs, set requires_grad per part."""
    from mumu_core.bundle import add_unet_lora, apply_unet_lora, load_bundle
    from mumu_core.sdxl import load_sdxl

    torch.manual_seed(cfg.optim.seed)  # same fresh weights (connector, LoRA A) on every rank
    load_dtype = DTYPES[cfg.model.frozen_dtype]
    encoder = MumuEncoder.from_pretrained(
        cfg.model.vlm,
        dtype=load_dtype,
        device="cpu",
        hidden_state_layer=preset.hidden_state_layer,
        keep_perceiver=cfg.model.keep_perceiver,
    )
    comps = load_sdxl(cfg.model.sdxl, preset, dtype=load_dtype, device="cpu")
    unet, vae = comps.unet, comps.vae
    connector = MumuConnector(preset.connector)
    parts = cfg.parts
    frozen_lora_state: dict[str, dict[str, torch.Tensor]] = {}
    adapter = {"vlm": "default", "unet": "default"}

    if cfg.model.init_bundle:
        bundle = load_bundle(cfg.model.init_bundle)
        from mumu_core.bundle import check_unet_compatible, check_vlm_compatible

        check_vlm_compatible(bundle, encoder)
        check_unet_compatible(bundle, dict(unet.config))
        connector.load_state_dict(bundle.connector_state, strict=True)
        for part, state, meta in (
            ("vlm", bundle.vlm_lora_state, bundle.meta.vlm_lora),
            ("unet", bundle.unet_lora_state, bundle.meta.unet_lora),
        ):
            if not state:
                continue
            mode = getattr(parts, part).mode
            if mode == "full":
                raise ValueError(
                    f"init_bundle {cfg.model.init_bundle} has a {part} LoRA but parts.{part}.mode=full: "
                    f"train that part with mode=lora (continuing the LoRA) or frozen"
                )
            if mode == "lora" and (meta["rank"], float(meta["alpha"])) != (
                getattr(parts, part).rank,
                float(getattr(parts, part).alpha),
            ):
                log(
                    f"note: continuing the init bundle's {part} LoRA at its rank {meta['rank']} / alpha "
                    f"{meta['alpha']} (the config's parts.{part}.rank/alpha apply to new LoRAs only)"
                )
            if part == "vlm":
                encoder.load_lora_state_dict(state, meta["rank"], meta["alpha"])
            else:
                apply_unet_lora(unet, bundle)
                adapter["unet"] = next(iter(unet.peft_config))
            if mode == "frozen":
                frozen_lora_state[part] = dict(state)
        log(f"initialised from bundle {cfg.model.init_bundle}")

    if parts.vlm.mode == "lora" and not encoder.has_lora():
        encoder.add_lora(parts.vlm.rank, parts.vlm.alpha)
    if parts.unet.mode == "lora" and not getattr(unet, "peft_config", None):
        add_unet_lora(unet, parts.unet.rank, parts.unet.alpha)

    from mumu_core.bundle import lora_meta_of

    lora = {"vlm": lora_meta_of(encoder.vlm), "unet": lora_meta_of(unet)}
    model = TrainModel(encoder, connector, unet, preset.negative_pooled)
    # peft marks only adapters trainable when it injects them; set every parameter explicitly instead.
    for name, p in model.named_parameters():
        part = part_of(name)
        mode = getattr(parts, part).mode
        is_lora = "lora_" in name
        p.requires_grad_(
            (mode == "full" and not is_lora) or (mode == "lora" and is_lora and part not in frozen_lora_state)
        )
        if p.requires_grad and p.dtype != torch.float32:  # fp32 masters, whatever frozen_dtype is
            p.data = p.data.float()
    if cfg.model.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
        connector.gradient_checkpointing = True
        unet.enable_gradient_checkpointing()
    model.train()
    vae_dtype = DTYPES[cfg.model.vae_dtype]
    if next(iter(vae.state_dict().values())).dtype != vae_dtype:
        vae.to(dtype=vae_dtype)
    vae.to(device=device).eval().requires_grad_(False)
    return Built(model, vae, comps.scheduler, preset, lora, adapter, frozen_lora_state)


def shard_model(model: TrainModel, cfg: TrainConfig, device: torch.device) -> None:
    """FSDP2: one unit per transformer block / UNet block, then the root (bf16 compute on GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.model.param_dtype], reduce_dtype=DTYPES[cfg.model.reduce_dtype]
    )
    kw = {"mesh": mesh, "mp_policy": mp}
    units: list[nn.Module] = list(model.connector.blocks)
    units += list(model.encoder.vlm.text_model.layers)
    units += [*model.unet.down_blocks, model.unet.mid_block, *model.unet.up_blocks]
    model.to(device)
    for m in units:
        fully_shard(m, **kw)
    fully_shard(model, **kw)


def trainable_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: TrainModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[str, list] = {}
    for name, p in trainable_named(model):
        groups.setdefault(part_of(name), []).append(p)
    out = []
    for part in PARTS:
        if part in groups:
            lr = getattr(cfg.parts, part).lr
            out.append({"params": groups[part], "lr": lr, "base_lr": lr, "name": part})
    return out
