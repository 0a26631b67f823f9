"""MUMU-mini's text-to-image base: the stand-in for pretrained SDXL (issue 11).

MUMU is a bootstrapping method: SDXL already draws from CLIP text, and MUMU only swaps CLIP for the
VLM + connector and trains LoRAs. The mini version needs the same starting point: a model that already
draws the mini world from text. This module builds and trains it from the classes SDXL is made of:

- ``UNet2DConditionModel`` with SDXL's ``text_time`` add-embedding (pooled text + 6 micro-conditioning ids);
- ``CLIPTextModelWithProjection`` (a tiny config): its last hidden states go into cross-attention and its
  projected pooled output is ``text_embeds``, as SDXL's second text encoder;
- a word-level tokenizer over the mini world's vocabulary (``tokenizer.json``, loaded with ``AutoTokenizer``);
- the pixel-space VAE and the mini preset's DDIM schedule (v-prediction, zero terminal SNR).

Its captions DO name colour, shape and background style ("a red triangle and a blue circle on a textured
background"), unlike MUMU's captions, which never do. The folder it writes is a diffusers SDXL-style
folder (``unet/``, ``vae/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``): ``mumu_core.sdxl.load_sdxl``
and ``python -m train`` read its ``unet/`` and ``vae/`` exactly as they read a real SDXL folder.

The same trainer makes the mini "community fine-tune" (``style="framed"``: every image gets a 2 px black
frame, a look the base never draws), the stand-in for Animagine in Finding 4.

Training is deterministic by step (the scenes of step ``s`` and its noise are functions of ``(seed, s)``),
so a resumed run continues exactly. Checkpoints are safetensors + JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..bundle import apply_umask_tree
from ..cli_help import plain
from ..conditioning import add_time_ids
from ..presets import MINI
from .world import (
    COLOURS,
    DEFAULT_WORLD,
    SHAPES,
    STYLES,
    TEMPLATES,
    Scene,
    WorldError,
    render_batch,
    scene_at,
)

# The UNet of the text-to-image base. Wider than the first mini model's 32/64/64 (1.7M parameters),
# which learned colour from named captions within minutes but never drew the named shape (issue 11).
BASE_UNET: dict = {
    **MINI.unet,
    "block_out_channels": [48, 96, 96],
    "attention_head_dim": [2, 4, 4],
    "norm_num_groups": 8,
}
TEXT_MAX_LEN = 16
# Tiny CLIP text tower: width = the UNet's cross-attention dim, projection = the pooled width.
TEXT_CONFIG: dict = {
    "hidden_size": MINI.unet["cross_attention_dim"],
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": TEXT_MAX_LEN,
    "projection_dim": MINI.connector.pooled_dim,
    "hidden_act": "quick_gelu",
}
SPECIAL_TOKENS = ("<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>")
FRAME_PX = 2


class BaseModelError(ValueError):
    """Bad arguments or folders for the mini base models (one readable line)."""


# -- captions and vocabulary -----------------------------------------------------------------------


def base_caption(scene: Scene) -> str:
    """The caption a text-to-image base learns from: colour, shape and background style named."""
    objects = " and ".join(f"{_article(o.colour)} {o.colour} {o.shape}" for o in scene.objects)
    template = TEMPLATES[0] if "in front of" not in scene.caption else TEMPLATES[1]
    return template.format(objects=objects, background=f"{scene.background.style} background")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def vocabulary() -> list[str]:
    words = {"a", "an", "and", "on", "in", "front", "of", "background", "shape", "object", "thing"}
    words |= set(COLOURS) | set(SHAPES) | set(STYLES)
    return [*SPECIAL_TOKENS, *sorted(words)]


def make_text_tokenizer():
    """Word-level tokenizer of the mini vocabulary, CLIP's conventions (bos ... eos, pad to 16)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[
            ("<|startoftext|>", vocab["<|startoftext|>"]),
            ("<|endoftext|>", vocab["<|endoftext|>"]),
        ],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TEXT_MAX_LEN,
    )


# -- the model set -----------------------------------------------------------------------------------


@dataclass
class T2IModel:
    """The text-to-image base in memory: tokenizer, text encoder, UNet, scheduler."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object

    def embed(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 16, 64), pooled (B, 64)) for ``captions`` ("" = the unconditional caption)."""
        ids = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=TEXT_MAX_LEN,
            truncation=True,
            return_tensors="pt",
        )
        out = self.text_encoder(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
        return out.last_hidden_state, out.text_embeds

    def denoise(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor):
        side = x.shape[-1]
        ids = add_time_ids((side, side), (0, 0), (side, side), batch=x.shape[0])
        return self.unet(
            x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}
        ).sample

    def save(self, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
        from ..pixel_vae import PixelSpaceVAE

        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        _save_module(self.unet, tmp / "unet", dtype)
        _save_module(self.text_encoder, tmp / "text_encoder", dtype)
        PixelSpaceVAE(channels=BASE_UNET["in_channels"]).save_pretrained(tmp / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(tmp / "scheduler")
        self.tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "model_index.json").write_text(
            json.dumps({"_class_name": "MumuMiniTextToImage", "about": "python -m mumu_core.mini base-t2i"})
        )
        apply_umask_tree(tmp)  # diffusers writes safetensors 0600, mkdtemp 0700
        _replace_dir(tmp, folder)
        return folder


def _save_module(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    if dtype == torch.float32:
        module.save_pretrained(path, safe_serialization=True)
        return
    orig = {k: v.clone() for k, v in module.state_dict().items()}
    module.to(dtype)
    module.save_pretrained(path, safe_serialization=True)
    module.to(torch.float32)
    module.load_state_dict(orig)


def _replace_dir(tmp: Path, folder: Path) -> None:
    import shutil

    old = folder.with_name(folder.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def build_t2i(seed: int = 0) -> T2IModel:
    """A random-init text-to-image base of the classes SDXL is made of."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = make_text_tokenizer()
    torch.manual_seed(seed)
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TEXT_CONFIG,
    )
    text_encoder = CLIPTextModelWithProjection(text_cfg)
    unet = UNet2DConditionModel(**BASE_UNET)
    return T2IModel(tokenizer, text_encoder, unet, DDIMScheduler(**MINI.scheduler))


def load_t2i(folder: str | Path) -> T2IModel:
    """Load a text-to-image base folder written by :meth:`T2IModel.save` (safetensors only)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = Path(folder)
    need = ["unet/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json", "scheduler"]
    missing = [n for n in need if not (folder / n).exists()]
    if missing:
        raise BaseModelError(
            f"{folder} is not a mini text-to-image base folder (missing {', '.join(missing)}): make one with "
            "`python -m mumu_core.mini base-t2i train --out DIR` or use the shipped "
            "mumu_core/mini/weights/base/t2i"
        )
    unet = UNet2DConditionModel.from_pretrained(
        folder / "unet", torch_dtype=torch.float32, use_safetensors=True
    )
    text_encoder = CLIPTextModelWithProjection.from_pretrained(
        folder / "text_encoder", dtype=torch.float32, use_safetensors=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    return T2IModel(tokenizer, text_encoder.eval(), unet.eval(), scheduler)


# -- data ----------------------------------------------------------------------------------------------


def apply_style(images: np.ndarray, style: str | None) -> np.ndarray:
    """(B, H, W, 3) uint8 -> the fine-tune's look. ``framed``: a black frame of FRAME_PX pixels."""
    if style is None:
        return images
    if style != "framed":
        raise BaseModelError(f"unknown fine-tune style {style!r}: the mini fine-tune style is 'framed'")
    out = images.copy()
    f = FRAME_PX
    out[:, :f] = 0
    out[:, -f:] = 0
    out[:, :, :f] = 0
    out[:, :, -f:] = 0
    return out


def frame_score(images: np.ndarray) -> np.ndarray:
    """Mean brightness (max over RGB, 0-1) of the frame ring of each (B, H, W, 3) uint8 image."""
    v = images.astype(np.float32).max(-1) / 255.0
    mask = np.zeros(v.shape[1:], bool)
    f = FRAME_PX
    mask[:f] = mask[-f:] = True
    mask[:, :f] = mask[:, -f:] = True
    return v[:, mask].mean(-1)


FRAMED_MAX_BRIGHTNESS = 0.12  # backgrounds are at least 0.12 bright (world._background_rgb); a frame is ~0


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def batch_at(
    step: int, batch_size: int, seed: int, style: str | None, p_two_objects: float | None = None
) -> tuple[np.ndarray, list[str]]:
    """The training batch of ``step``: train-split scenes, deterministic (resume is exact).

    ``p_two_objects`` overrides the world's share of two-object scenes (None: the world's own)."""
    base = (seed * 1_000_003 + step) * batch_size
    world = DEFAULT_WORLD if p_two_objects is None else replace(DEFAULT_WORLD, p_two_objects=p_two_objects)
    scenes = [scene_at("train", base + i, world) for i in range(batch_size)]
    return apply_style(render_batch(scenes), style), [base_caption(s) for s in scenes]


# -- training ------------------------------------------------------------------------------------------


@dataclass
class T2ITrainConfig:
    out: Path
    max_steps: int = 6000
    minutes: float | None = None  # wall-clock limit; the run saves and stops there
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # captions replaced by "" (the unconditional caption for guidance)
    # Min-SNR-gamma loss weighting (Hang et al. 2023): caps the weight of the low-noise steps, whose
    # fine-detail gradients fight the mid-noise ones where an object's shape is decided. None = off.
    min_snr_gamma: float | None = None
    checkpoint_every: int = 250
    seed: int = 0
    style: str | None = None  # None: the base; "framed": the fine-tune
    init: Path | None = None  # start from this base folder (the fine-tune)
    # Share of two-object scenes (None: the world's 0.5); more of them is a lever on binding two named
    # objects, the ceiling of MUMU's two-reference prompts.
    p_two_objects: float | None = None
    train_text_encoder: bool = True
    log_every: int = 50
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        d["init"] = None if self.init is None else str(self.init)
        return d


def _lr_factor(step: int, cfg: T2ITrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def _trainable(model: T2IModel, cfg: T2ITrainConfig) -> dict[str, torch.nn.Parameter]:
    params = {f"unet.{k}": p for k, p in model.unet.named_parameters()}
    if cfg.train_text_encoder:
        params |= {f"text_encoder.{k}": p for k, p in model.text_encoder.named_parameters()}
    else:
        model.text_encoder.requires_grad_(False)
    return params


def _save_checkpoint(ckpt: Path, step: int, params, ema, opt: torch.optim.Optimizer, cfg) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().contiguous() for k, p in params.items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    names = list(params)
    opt_state: dict[str, torch.Tensor] = {}
    for i, p in enumerate(params.values()):
        st = opt.state.get(p)
        if st:
            for key in ("exp_avg", "exp_avg_sq"):
                opt_state[f"{names[i]}.{key}"] = st[key].contiguous()
            opt_state[f"{names[i]}.step"] = torch.as_tensor(st["step"], dtype=torch.float64).reshape(1)
    save_file(opt_state, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "config": cfg.to_json()}, indent=2))
    _replace_dir(tmp, ckpt)


def _load_checkpoint(ckpt: Path, params, ema, opt: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    model_sd = load_file(str(ckpt / "model.safetensors"))
    if set(model_sd) != set(params):
        raise BaseModelError(f"checkpoint {ckpt} holds other parameters than this model: use a new --out")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(model_sd[k])
    ema.update(load_file(str(ckpt / "ema.safetensors")))
    opt_sd = load_file(str(ckpt / "optim.safetensors"))
    for k, p in params.items():
        if f"{k}.exp_avg" in opt_sd:
            opt.state[p] = {
                "step": torch.tensor(float(opt_sd[f"{k}.step"].item())),
                "exp_avg": opt_sd[f"{k}.exp_avg"].clone(),
                "exp_avg_sq": opt_sd[f"{k}.exp_avg_sq"].clone(),
            }
    return int(state["step"])


def _weighted_loss(pred, target, t, sched, gamma: float | None) -> torch.Tensor:
    """MSE on v; with ``gamma``, each sample weighted min(snr, gamma) / (snr + 1) (v-prediction form)."""
    if gamma is None:
        return torch.nn.functional.mse_loss(pred, target)
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac).clamp_min(1e-8)
    w = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    # Zero terminal SNR makes the pure-noise step's weight 0, but sampling starts there: keep it at 1.
    w = torch.where(snr == 0, torch.ones_like(w), w)
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return (w * per_sample).mean()


def train_t2i(cfg: T2ITrainConfig, log=print) -> Path:
    """Train the base (or, with ``cfg.init`` + ``cfg.style``, the fine-tune); returns the model folder.

    ``cfg.out`` gets ``checkpoint/`` (resumable), ``model/`` (the EMA weights, updated at every checkpoint
    and at the end) and ``train.json`` (config, steps, wall time, loss curve).
    """
    from tqdm import tqdm

    cfg.out.mkdir(parents=True, exist_ok=True)
    if not os.access(cfg.out, os.W_OK):
        raise BaseModelError(f"cannot write to {cfg.out}: choose a writable --out")
    model = load_t2i(cfg.init) if cfg.init else build_t2i(cfg.seed)
    model.unet.train()
    model.text_encoder.train(cfg.train_text_encoder)
    params = _trainable(model, cfg)
    ema = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = cfg.out / "checkpoint"
    step = _load_checkpoint(ckpt, params, ema, opt) if (ckpt / "state.json").is_file() else 0
    if step:
        log(f"resumed from {ckpt} at step {step}")
    history_path = cfg.out / "train.json"
    history = json.loads(history_path.read_text()) if step and history_path.is_file() else {"loss": []}
    history["config"] = cfg.to_json()
    sched = model.scheduler
    n_train = sched.config.num_train_timesteps

    stop = {"signal": None}

    def _on_signal(signum, _frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    start = time.time()
    wall_before = float(history.get("wall_s", 0.0))
    losses: list[float] = []

    def save(final: bool = False) -> None:
        _save_checkpoint(ckpt, step, params, ema, opt, cfg)
        with torch.no_grad():
            live = {k: p.detach().clone() for k, p in params.items()}
            for k, p in params.items():
                p.copy_(ema[k])
            model.save(cfg.out / "model")
            for k, p in params.items():
                p.copy_(live[k])
        history.update(step=step, wall_s=wall_before + time.time() - start, finished=final)
        tmp = history_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(history, indent=1))
        os.replace(tmp, history_path)

    try:
        bar = tqdm(total=cfg.max_steps, initial=step, desc="base-t2i" if not cfg.style else "finetune")
        while step < cfg.max_steps:
            images, captions = batch_at(step, cfg.batch_size, cfg.seed, cfg.style, cfg.p_two_objects)
            g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
            drop = torch.rand(len(captions), generator=g) < cfg.cond_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
            x0 = to_tensor(images)
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, n_train, (x0.shape[0],), generator=g)
            noisy = sched.add_noise(x0, noise, t)
            target = sched.get_velocity(x0, noise, t)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            context, pooled = model.embed(captions)
            pred = model.denoise(noisy, t, context, pooled)
            loss = _weighted_loss(pred, target, t, sched, cfg.min_snr_gamma)
            if not torch.isfinite(loss):
                raise BaseModelError(f"loss became {loss.item()} at step {step}: lower --lr and resume")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            opt.step()
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for k, p in params.items():
                    ema[k].mul_(d).add_(p.detach(), alpha=1 - d)
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % cfg.log_every == 0:
                history["loss"].append([step, float(np.mean(losses))])
                bar.set_postfix(loss=f"{np.mean(losses):.4f}")
                losses.clear()
            over_time = cfg.minutes is not None and (time.time() - start) / 60 >= cfg.minutes
            if stop["signal"] is not None or over_time:
                log(f"stopping at step {step} ({'signal' if stop['signal'] else 'time limit'}); saving")
                break
            if step % cfg.checkpoint_every == 0:
                save()
        bar.close()
        save(final=step >= cfg.max_steps)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return cfg.out / "model"


# -- sampling and the check --------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: T2IModel,
    captions: Sequence[str],
    guidance: float = 3.0,
    steps: int = 20,
    seed: int = 0,
    side: int = 24,
) -> np.ndarray:
    """DDIM with classifier-free guidance against the empty caption; (B, side, side, 3) uint8."""
    ctx, pooled = model.embed(list(captions))
    return generate_from(model, ctx, pooled, guidance, steps, seed, side)


@torch.no_grad()
def generate_from(
    model: T2IModel,
    ctx: torch.Tensor,
    pooled: torch.Tensor,
    guidance: float = 3.0,
    steps: int = 20,
    seed: int = 0,
    side: int = 24,
) -> np.ndarray:
    """:func:`generate` from text-encoder outputs (``model.embed``), which diagnostics may mix: the probe
    takes the context of one caption and the pooled vector of another."""
    sched = type(model.scheduler).from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    n = ctx.shape[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 3, side, side), generator=g)
    uctx, upooled = model.embed([""] * n)
    for t in sched.timesteps:
        tt = t.expand(n)
        if guidance == 1.0:
            v = model.denoise(x, tt, ctx, pooled)
        else:
            vv = model.denoise(
                torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uctx, ctx]), torch.cat([upooled, pooled])
            )
            vu, vc = vv.chunk(2)
            v = vu + guidance * (vc - vu)
        x = sched.step(v, t, x).prev_sample
    return to_uint8(x)


def check_t2i(
    folder: str | Path,
    n: int = 96,
    guidance: float = 3.0,
    steps: int = 20,
    seed: int = 0,
    style: str | None = None,
) -> dict:
    """How often a generated image shows each attribute its caption names (the ceiling for MUMU).

    Held-out ``eval``-split scenes, balanced over colours x shapes for single objects; two-object
    captions are scored by the best one-to-one match of the two largest detections.
    """
    from .analyser import Analyser

    model = load_t2i(folder)
    analyser = Analyser.load()
    singles = [
        scene_at("eval", 500_000 + k, n_objects=1, colours=[COLOURS[k % 6]], shapes=[SHAPES[(k // 6) % 4]])
        for k in range(n)
    ]
    pairs = [scene_at("eval", 600_000 + k, n_objects=2) for k in range(n // 2)]
    out: dict = {
        "folder": str(folder),
        "guidance": guidance,
        "steps": steps,
        "n_single": n,
        "n_pair": len(pairs),
    }
    imgs = _generate_batched(model, [base_caption(s) for s in singles], guidance, steps, seed)
    res = analyser.analyse(list(imgs), max_objects=1)
    colour = shape = style_ok = found = 0
    for s, a in zip(singles, res, strict=True):
        style_ok += a.style == s.background.style
        if a.detections:
            d = a.detections[0]
            found += 1
            colour += d.colour == s.objects[0].colour
            shape += d.shape == s.objects[0].shape
    out["single"] = {"found": found / n, "colour": colour / n, "shape": shape / n, "style": style_ok / n}
    imgs_p = _generate_batched(model, [base_caption(s) for s in pairs], guidance, steps, seed + 1)
    res_p = analyser.analyse(list(imgs_p), max_objects=2)
    two = both_c = both_s = 0
    for s, a in zip(pairs, res_p, strict=True):
        dets = a.detections[:2]
        two += len(dets) == 2
        if len(dets) == 2:
            o = s.objects
            best = max(
                ((dets[0], o[0]), (dets[1], o[1])),
                ((dets[0], o[1]), (dets[1], o[0])),
                key=lambda m: sum((d.colour == w.colour) + (d.shape == w.shape) for d, w in m),
            )
            both_c += all(d.colour == w.colour for d, w in best)
            both_s += all(d.shape == w.shape for d, w in best)
    m = len(pairs)
    out["pair"] = {"two_objects": two / m, "both_colours": both_c / m, "both_shapes": both_s / m}
    fr = frame_score(np.concatenate([imgs, imgs_p]))
    out["framed"] = float((fr < FRAMED_MAX_BRIGHTNESS).mean())
    out["samples"] = imgs[:24]
    return out


def _generate_batched(model, captions, guidance, steps, seed, chunk: int = 48) -> np.ndarray:
    parts = [
        generate(model, captions[i : i + chunk], guidance, steps, seed + i)
        for i in range(0, len(captions), chunk)
    ]
    return np.concatenate(parts)


def sample_sheet(
    images: np.ndarray, captions: Sequence[str], path: Path, scale: int = 4, cols: int = 8
) -> Path:
    """A grid of samples (x``scale``) with their captions below, for a person to look at."""
    from PIL import ImageDraw

    n = len(images)
    rows = math.ceil(n / cols)
    cell = images.shape[1] * scale
    cap_h = 22
    sheet = Image.new("RGB", (cols * cell, rows * (cell + cap_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, cap) in enumerate(zip(images, captions, strict=False)):
        r, c = divmod(i, cols)
        sheet.paste(Image.fromarray(im).resize((cell, cell), Image.NEAREST), (c * cell, r * (cell + cap_h)))
        words = cap.replace(" background", "").replace("in front of", "on").split(" on ")
        draw.text((c * cell + 2, r * (cell + cap_h) + cell), words[0][:18], fill="black")
        if len(words) > 1:
            draw.text((c * cell + 2, r * (cell + cap_h) + cell + 10), "bg: " + words[1][2:][:14], fill="gray")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# -- shipping ------------------------------------------------------------------------------------------

BASE_WEIGHTS_DIR = Path(__file__).parent / "weights" / "base"


def ship_base(
    model_dir: str | Path, name: str, info: dict, weights_dir: str | Path = BASE_WEIGHTS_DIR
) -> dict:
    """Copy a trained base folder into ``weights_dir/name`` as float16 with ``name.json`` beside it.

    The json records the sha256 of every file (checked by the tests), the exact command, the hardware,
    the training summary (steps, wall time) and ``info`` (e.g. the check's accuracies).
    """
    import shutil
    import tempfile

    from .demo import _hardware, _to_fp16_safetensors, file_hashes

    model_dir, weights_dir = Path(model_dir), Path(weights_dir)
    load_t2i(model_dir)  # refuse anything that is not a complete base folder
    weights_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=weights_dir, prefix=f".{name}.shipping."))
    try:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
        for f in sorted(tmp.rglob("*.safetensors")):
            _to_fp16_safetensors(f)
        apply_umask_tree(tmp)  # diffusers writes safetensors 0600, mkdtemp 0700
        dest = weights_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    train = model_dir.parent / "train.json"
    record = {
        "format": "MUMU-mini text-to-image base folder (unet/, text_encoder/, tokenizer/, vae/, scheduler/)",
        "dtype": "float16",
        "hardware": _hardware(),
        **info,
        "train": json.loads(train.read_text()) if train.is_file() else None,
        "files": file_hashes(dest),
    }
    (weights_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# -- command line ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mumu_core.mini base-t2i {train,finetune,init,check,ship}``."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="python -m mumu_core.mini base-t2i", description=plain(main.__doc__ or "")
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (
        ("train", "train the text-to-image base from random init (captions name colour, shape, style)"),
        ("finetune", "fine-tune a base to the 'framed' style (the mini community fine-tune)"),
    ):
        t = sub.add_parser(name, help=text)
        t.add_argument("--out", type=Path, required=True, help="run folder (checkpoint/, model/, train.json)")
        t.add_argument("--max-steps", type=int, default=3000 if name == "train" else 400)
        t.add_argument("--minutes", type=float, default=None, help="wall-clock limit (saves, then stops)")
        t.add_argument("--batch-size", type=int, default=32)
        t.add_argument("--lr", type=float, default=1e-3 if name == "train" else 2e-4)
        t.add_argument("--seed", type=int, default=0 if name == "train" else 1)
        t.add_argument("--ema-decay", type=float, default=0.999)
        if name == "finetune":
            t.add_argument("--base", type=Path, required=True, help="the base model folder to start from")
        else:
            t.add_argument(
                "--init", type=Path, default=None, help="continue from this base model folder (RUN/model)"
            )
            t.add_argument(
                "--min-snr",
                type=float,
                default=None,
                help="min-SNR-gamma loss weighting (e.g. 5); off by default",
            )
            t.add_argument("--warmup-steps", type=int, default=200)
            t.add_argument(
                "--p-two-objects",
                type=float,
                default=None,
                help="share of two-object scenes in the batches (default: the world's 0.5)",
            )
    ini = sub.add_parser(
        "init",
        help="write an untrained (random-init) base folder of the same architecture: the from-scratch "
        "recipe's starting point (train/configs/mini_scratch.yaml)",
    )
    ini.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    ini.add_argument("--seed", type=int, default=0)
    sh = sub.add_parser(
        "ship", help="copy a trained base into mumu_core/mini/weights/base/NAME (float16 + hashes)"
    )
    sh.add_argument("--model", type=Path, required=True, help="RUN/model")
    sh.add_argument("--name", required=True, choices=["t2i", "finetune"])
    sh.add_argument("--command", required=True, help="the exact command that trained it (recorded)")
    sh.add_argument("--check", type=Path, default=None, help="a check.json to record with it")
    c = sub.add_parser("check", help="how often generated images show the attributes their captions name")
    c.add_argument("--model", type=Path, required=True, help="a base model folder (RUN/model)")
    c.add_argument("--n", type=int, default=96)
    c.add_argument("--guidance", type=float, default=3.0)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--out", type=Path, default=None, help="write check.json and a contact sheet here")
    args = ap.parse_args(argv)
    try:
        if args.cmd in ("train", "finetune"):
            cfg = T2ITrainConfig(
                out=args.out,
                max_steps=args.max_steps,
                minutes=args.minutes,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                ema_decay=args.ema_decay,
                warmup_steps=args.warmup_steps if args.cmd == "train" else 20,
                checkpoint_every=250 if args.cmd == "train" else 100,
            )
            if args.cmd == "train":
                cfg.init, cfg.min_snr_gamma, cfg.p_two_objects = args.init, args.min_snr, args.p_two_objects
                if cfg.p_two_objects is not None:  # a bad share fails here, before anything is written
                    replace(DEFAULT_WORLD, p_two_objects=cfg.p_two_objects)
                if cfg.init is not None:
                    load_t2i(cfg.init)  # a bad --init fails here, before anything is written
            if args.cmd == "finetune":
                cfg.init, cfg.style, cfg.train_text_encoder = args.base, "framed", False
            print(f"model: {train_t2i(cfg)}")
            return 0
        if args.cmd == "init":
            if args.out.exists():
                raise BaseModelError(f"{args.out} exists: choose a new --out (nothing was written)")
            print(f"random-init base: {build_t2i(args.seed).save(args.out)}")
            return 0
        if args.cmd == "ship":
            info = {"command": args.command}
            if args.check is not None:
                info["check"] = json.loads(args.check.read_text())
            rec = ship_base(args.model, args.name, info)
            print(f"shipped {len(rec['files'])} files to {BASE_WEIGHTS_DIR / args.name}")
            return 0
        res = check_t2i(args.model, n=args.n, guidance=args.guidance, steps=args.steps)
        samples = res.pop("samples")
        print(json.dumps(res, indent=1))
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "check.json").write_text(json.dumps(res, indent=1))
            caps = [
                base_caption(
                    scene_at(
                        "eval",
                        500_000 + k,
                        n_objects=1,
                        colours=[COLOURS[k % 6]],
                        shapes=[SHAPES[(k // 6) % 4]],
                    )
                )
                for k in range(len(samples))
            ]
            print(f"sheet: {sample_sheet(samples, caps, args.out / 'check_sheet.png')}")
        return 0
    except (BaseModelError, WorldError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
