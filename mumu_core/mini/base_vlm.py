"""The mini VLM base: the mini Idefics2, perceiver resampler in place, pretrained to describe mini images.

MUMU bootstraps from a VLM that can already see (idefics2-8b). The mini stand-in is the ``mini``
preset's ``Idefics2ForConditionalGeneration`` (byte-level tokenizer), trained here from scratch with
next-token loss on the answer tokens only, on three kinds of train-split images:

- full 24 px scenes -> "two shapes: a red triangle and a blue circle on a textured background"
  (objects left to right, so the target is a function of the image);
- single-object crops, prepared exactly as MUMU prepares references (``prompt.prepare_image`` at 1 / 4 /
  9 / 16 tokens -> 4 / 8 / 12 / 16 px) -> "a red triangle";
- background-style patches (``world.style_reference``, prepared the same way) -> "a textured background".

The input is Idefics2's own format: ``User:<fake_token_around_image><image>*n_latents
<fake_token_around_image>Describe the image.<end_of_utterance>\\nAssistant: ANSWER<end_of_utterance>``,
run through the model's own forward with ``pixel_values`` / ``pixel_attention_mask`` (images padded to
24 px, the mask marks the real pixels), so the perceiver resampler turns every image into its
``n_latents`` tokens, as in the real checkpoint. MUMU later removes the perceiver
(``MumuEncoder.from_pretrained``), or keeps it for Finding 1's ablation (``keep_perceiver=True``).

    python -m mumu_core.mini base-vlm train --out runs/vlm_base --max-steps 7000
    # the shipped base's second and third runs: style patches half of each batch, half the learning rate
    python -m mumu_core.mini base-vlm train --out runs/vlm_base2a --init runs/vlm_base/vlm \
        --kind-weights 0.25 0.25 0.5 --lr 5e-4 --warmup-steps 100 --max-steps 6000
    python -m mumu_core.mini base-vlm train --out runs/vlm_base3a --init runs/vlm_base2a/vlm \
        --kind-weights 0.25 0.25 0.5 --lr 5e-4 --warmup-steps 100 --max-steps 6000
    python -m mumu_core.mini base-vlm check --vlm runs/vlm_base3a/vlm
    python -m mumu_core.mini base-vlm ship --run runs/vlm_base3a    # -> mumu_core/mini/weights/base/vlm/

Checkpoints (``OUT/checkpoint/``) are safetensors + json only: the model, the AdamW state flattened into
``optimizer.safetensors`` and ``state.json`` (step, wall time). Data is a function of the step, so a
resumed run continues with exactly the batches it would have seen. SIGTERM / Ctrl-C save a checkpoint and
the HF folder, then exit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..cli_help import plain
from ..presets import FAKE_IMAGE_TOKEN, IMAGE_TOKEN, MINI, build_vlm_folder, make_byte_tokenizer
from ..prompt import prepare_image
from .world import COLOURS, SHAPES, STYLES, Scene, object_crop, render, scene_at, style_reference

PACKAGE_DIR = Path(__file__).resolve().parent
SHIP_DIR = PACKAGE_DIR / "weights" / "base" / "vlm"
SHIP_JSON = PACKAGE_DIR / "weights" / "base" / "vlm.json"

KINDS = ("scene", "crop", "style")
# Token budgets MUMU gives references in the mini (sides 4 / 8 / 12 / 16 px at patch 4).
REFERENCE_TOKENS = (1, 4, 9, 16)
SCENE_TOKENS = 36  # a full 24 px scene: 6 x 6 patches of 4 px
QUESTION = "Describe the image."
END = "<end_of_utterance>"
COUNT_WORDS = {1: "one shape", 2: "two shapes"}


class BaseVLMError(ValueError):
    """Bad arguments or a missing / incomplete folder; the message says what to do."""


# ------------------------------------------------------------------------------------------ captions


def scene_caption(scene: Scene) -> str:
    """ "two shapes: a red triangle and a blue circle on a textured background" (objects left to right)."""
    objects = sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))
    names = " and ".join(f"a {o.colour} {o.shape}" for o in objects)
    return f"{COUNT_WORDS[len(objects)]}: {names} on a {scene.background.style} background"


def crop_caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def style_caption(style: str) -> str:
    return f"a {style} background"


@dataclass(frozen=True)
class ParsedCaption:
    count: int | None  # from "one shape" / "two shapes"; None when absent
    objects: tuple[tuple[str, str], ...]  # (colour, shape) pairs in caption order
    style: str | None  # "<style> background"; None when absent


_OBJECT_RE = re.compile(rf"\b({'|'.join(COLOURS)})\s+({'|'.join(SHAPES)})\b")
_STYLE_RE = re.compile(rf"\b({'|'.join(STYLES)})\s+background\b")
_COUNT_RE = re.compile(r"\b(one|two)\s+shapes?\b")


def parse_caption(text: str) -> ParsedCaption:
    """The attributes a caption names: count word, every "<colour> <shape>" pair, "<style> background"."""
    text = text.lower()
    count = _COUNT_RE.search(text)
    style = _STYLE_RE.search(text)
    return ParsedCaption(
        count={"one": 1, "two": 2}[count.group(1)] if count else None,
        objects=tuple((m.group(1), m.group(2)) for m in _OBJECT_RE.finditer(text)),
        style=style.group(1) if style else None,
    )


def score_caption(kind: str, text: str, truth: dict[str, Any]) -> dict[str, bool]:
    """Per-attribute correctness of one generated caption against the image's ground truth.

    scene: count, colours / shapes / objects as multisets (order-free), style; crop: colour, shape, both
    (exactly one object named); style: style.
    """
    p = parse_caption(text)
    if kind == "scene":
        objs = [tuple(o) for o in truth["objects"]]
        return {
            "count": p.count == len(objs),
            "colour": Counter(c for c, _ in p.objects) == Counter(c for c, _ in objs),
            "shape": Counter(s for _, s in p.objects) == Counter(s for _, s in objs),
            "object": Counter(p.objects) == Counter(objs),
            "style": p.style == truth["style"],
        }
    if kind == "crop":
        one = p.objects[0] if len(p.objects) == 1 else (None, None)
        return {
            "colour": one[0] == truth["colour"],
            "shape": one[1] == truth["shape"],
            "object": one == (truth["colour"], truth["shape"]),
        }
    if kind == "style":
        return {"style": p.style == truth["style"]}
    raise BaseVLMError(f"unknown sample kind {kind!r}; one of {KINDS}")


# ------------------------------------------------------------------------------------------ samples


@dataclass
class Sample:
    kind: str
    image: Image.Image  # prepared (square, side = patch * sqrt(tokens))
    answer: str
    tokens: int  # the reference token budget the image was prepared at (scene: 36)
    truth: dict[str, Any]


def make_sample(kind: str, split: str, index: int, rng: np.random.Generator, patch: int = 4) -> Sample:
    """Sample ``kind`` from scene ``index`` of ``split``; ``rng`` picks the object and the token budget."""
    if kind == "scene":
        s = scene_at(split, index)
        truth = {"objects": [[o.colour, o.shape] for o in s.objects], "style": s.background.style}
        return Sample(kind, prepare_image(render(s), SCENE_TOKENS, None, patch), scene_caption(s), 36, truth)
    tokens = int(REFERENCE_TOKENS[int(rng.integers(len(REFERENCE_TOKENS)))])
    if kind == "crop":
        s = scene_at(split, index)
        o = s.objects[int(rng.integers(len(s.objects)))]
        crop = object_crop(s, s.objects.index(o))
        truth = {"colour": o.colour, "shape": o.shape}
        return Sample(
            kind, prepare_image(crop, tokens, None, patch), crop_caption(o.colour, o.shape), tokens, truth
        )
    if kind == "style":
        s = scene_at(split, index, require_style_box=True)
        truth = {"style": s.background.style}
        ref = style_reference(s)
        return Sample(
            kind, prepare_image(ref, tokens, None, patch), style_caption(s.background.style), tokens, truth
        )
    raise BaseVLMError(f"unknown sample kind {kind!r}; one of {KINDS}")


@dataclass(frozen=True)
class TrainSettings:
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 300
    max_steps: int = 30000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    # Fractions of scenes / crops / style patches per batch: scenes carry the most words to learn.
    kind_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)
    checkpoint_every: int = 1000
    seed: int = 0
    # An Idefics2 folder to continue from (a finished base, e.g. RUN/vlm) instead of a random init.
    init: str | None = None

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1 or self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise BaseVLMError("batch_size, max_steps and checkpoint_every must be >= 1, warmup_steps >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise BaseVLMError("lr must be > 0 and min_lr_ratio in [0, 1]")
        if len(self.kind_weights) != 3 or min(self.kind_weights) < 0 or sum(self.kind_weights) <= 0:
            raise BaseVLMError(
                "kind_weights needs 3 non-negative weights (scene, crop, style) with a positive sum"
            )


def train_batch(step: int, settings: TrainSettings, patch: int = 4) -> list[Sample]:
    """The batch of optimizer step ``step``: a pure function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([settings.seed, step])
    w = np.asarray(settings.kind_weights, dtype=np.float64)
    kinds = rng.choice(len(KINDS), size=settings.batch_size, p=w / w.sum())
    # Train-split scene indices from a large range; the eval split is a disjoint seed stream.
    indices = rng.integers(0, 10_000_000, size=settings.batch_size)
    return [make_sample(KINDS[k], "train", int(i), rng, patch) for k, i in zip(kinds, indices)]


# ------------------------------------------------------------------------------------------ model inputs


def prompt_text(n_image_tokens: int) -> str:
    """Idefics2's chat format with one image (the answer follows after "Assistant:")."""
    image = FAKE_IMAGE_TOKEN + IMAGE_TOKEN * n_image_tokens + FAKE_IMAGE_TOKEN
    return f"User:{image}{QUESTION}{END}\nAssistant:"


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    labels: torch.Tensor  # (B, L), -100 outside the answer
    pixel_values: torch.Tensor  # (B, 1, 3, S, S), zero-padded
    pixel_attention_mask: torch.Tensor  # (B, 1, S, S) bool


def pixels(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float], side: int = 24):
    """(B, 1, 3, side, side) normalised pixels, each image top-left, padding 0 and masked out."""
    px = torch.zeros(len(images), 1, 3, side, side)
    mask = torch.zeros(len(images), 1, side, side, dtype=torch.bool)
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    for i, img in enumerate(images):
        w, h = img.size
        if w > side or h > side:
            raise BaseVLMError(f"image {w}x{h} is larger than the {side}px canvas")
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        px[i, 0, :, :h, :w] = (x - m) / s
        mask[i, 0, :h, :w] = True
    return px, mask


def collate(
    samples: Sequence[Sample], tokenizer, n_latents: int, mean, std, with_answer: bool = True
) -> Batch:
    prompt_ids = tokenizer(tokenizer.bos_token + prompt_text(n_latents), add_special_tokens=False)[
        "input_ids"
    ]
    rows, labels = [], []
    for s in samples:
        ids = list(prompt_ids)
        lab = [-100] * len(ids)
        if with_answer:
            ans = tokenizer(" " + s.answer + END, add_special_tokens=False)["input_ids"]
            ids += ans
            lab += ans
        rows.append(ids)
        labels.append(lab)
    n = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id or 0
    input_ids = torch.full((len(rows), n), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), n, dtype=torch.long)
    lab_t = torch.full((len(rows), n), -100, dtype=torch.long)
    for b, (r, lab) in enumerate(zip(rows, labels)):
        input_ids[b, : len(r)] = torch.tensor(r)
        attn[b, : len(r)] = 1
        lab_t[b, : len(lab)] = torch.tensor(lab)
    px, pmask = pixels([s.image for s in samples], mean, std)
    return Batch(input_ids, attn, lab_t, px, pmask)


def n_latents_of(model) -> int:
    return int(model.config.perceiver_config.resampler_n_latents)


def _image_stats(folder: Path) -> tuple[list[float], list[float]]:
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    return pre.get("image_mean", [0.5] * 3), pre.get("image_std", [0.5] * 3)


# ------------------------------------------------------------------------------------------ checkpoints


def _atomic_dir(dest: Path, write) -> None:
    """Write a folder beside ``dest`` and rename it into place, so a kill never leaves half a folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        write(tmp)
        old = dest.parent / f".{dest.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(path: Path, model, optimizer, state: dict[str, Any]) -> None:
    """model.safetensors + optimizer.safetensors (AdamW state flattened) + state.json, atomically."""
    from safetensors.torch import save_file

    names = [n for n, _ in model.named_parameters()]
    opt = optimizer.state_dict()
    flat: dict[str, torch.Tensor] = {}
    for idx, st in opt["state"].items():
        for k, v in st.items():
            flat[f"{names[idx]}::{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]

    def write(tmp: Path) -> None:
        model_state = {n: p.detach().contiguous().clone() for n, p in model.named_parameters()}
        save_file(model_state, str(tmp / "model.safetensors"))
        save_file(flat, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps({**state, "param_names": names, "param_groups": groups}, indent=1) + "\n"
        )

    _atomic_dir(path, write)


def load_checkpoint(path: Path, model, optimizer) -> dict[str, Any]:
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    names = [n for n, _ in model.named_parameters()]
    if state["param_names"] != names:
        raise BaseVLMError(
            f"the checkpoint in {path} was made for another model layout (different parameters); "
            "use a fresh --out folder or delete the checkpoint"
        )
    weights = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    flat = load_file(str(path / "optimizer.safetensors"))
    per: dict[int, dict[str, torch.Tensor]] = {}
    index = {n: i for i, n in enumerate(names)}
    for key, v in flat.items():
        name, k = key.rsplit("::", 1)
        per.setdefault(index[name], {})[k] = v
    groups = [{**g, "params": list(range(len(names)))} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per, "param_groups": groups})
    return state


def export_folder(model, dest: Path, init_dir: Path, dtype: torch.dtype | None = None) -> None:
    """The Hugging Face Idefics2 folder: config.json, model.safetensors, tokenizer, preprocessor_config.json."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "preprocessor_config.json",
        ):
            if (init_dir / name).is_file():
                shutil.copy2(init_dir / name, tmp / name)
        if dtype is not None:
            _cast_safetensors(tmp / "model.safetensors", dtype)

    _atomic_dir(dest, write)


def _cast_safetensors(path: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=meta)


# ------------------------------------------------------------------------------------------ training


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine to ``min_lr_ratio``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    t = min(1.0, (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps))
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _build_model(init_dir: Path, seed: int, fresh: bool = True):
    from transformers import Idefics2ForConditionalGeneration

    model = Idefics2ForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    if not fresh:  # continuing a trained base: its latents are learned
        return model
    # Idefics2 initialises every perceiver latent to ones: identical queries give identical outputs and
    # only the LM's positions would slowly tell them apart. Random latents start them different.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lat = model.model.connector.perceiver_resampler.latents
        lat.copy_(torch.randn(lat.shape, generator=g))
    return model


def train(
    out: str | Path,
    settings: TrainSettings = TrainSettings(),
    minutes: float | None = None,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Pretrain (or resume) into ``out``; returns the summary also written to ``out/train.json``.

    Stops at ``settings.max_steps``, after ``minutes`` of wall time, or on SIGTERM / Ctrl-C; always ends
    with a checkpoint (``out/checkpoint``) and the HF folder (``out/vlm``, float32). With
    ``settings.init`` the run starts from that finished base (copied to ``out/init``) instead of a random
    init, with a fresh optimizer and schedule: the later runs of a multi-run recipe.
    """
    from tqdm import tqdm

    settings.validate()
    if minutes is not None and minutes <= 0:
        raise BaseVLMError(f"--minutes must be > 0, got {minutes}")
    init_src = None
    if settings.init is not None:  # checked before anything is written
        from ..encoder import check_vlm_folder

        init_src = check_vlm_folder(settings.init)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    init_dir, ckpt_dir = out / "init", out / "checkpoint"
    settings_file = out / "settings.json"
    if ckpt_dir.is_dir():
        saved = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        mine = json.loads(json.dumps(asdict(settings)))
        differ = sorted(
            k for k in mine if k not in ("max_steps", "checkpoint_every") and saved.get(k) != mine[k]
        )
        if differ:
            raise BaseVLMError(
                f"{out} holds a run with other settings ({differ}); resume with the same settings or use a fresh --out"
            )
    if not init_dir.is_dir():
        if init_src is None:
            _atomic_dir(init_dir, lambda tmp: build_vlm_folder(MINI, tmp, seed=settings.seed))
        else:
            _atomic_dir(init_dir, lambda tmp: shutil.copytree(init_src, tmp, dirs_exist_ok=True))
    settings_file.write_text(json.dumps(asdict(settings), indent=1) + "\n")

    torch.manual_seed(settings.seed)
    model = _build_model(init_dir, settings.seed, fresh=settings.init is None)
    tokenizer = make_byte_tokenizer()
    mean, std = _image_stats(init_dir)
    n_latents = n_latents_of(model)
    patch = int(model.config.vision_config.patch_size)
    # One group holding every parameter in named_parameters order keeps the flattened optimizer state
    # keyed by parameter name; AdamW's decoupled weight decay is applied by hand, to the matrices only.
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.98))
    decayed = [p.ndim >= 2 and "latents" not in n for n, p in model.named_parameters()]

    step, wall_before, losses = 0, 0.0, []
    if ckpt_dir.is_dir():
        st = load_checkpoint(ckpt_dir, model, optimizer)
        step, wall_before, losses = st["step"], st["wall_s"], st.get("recent_losses", [])
        log(f"resumed from {ckpt_dir} at step {step}")

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    t0 = time.monotonic()
    deadline = t0 + minutes * 60 if minutes is not None else None
    status = "max_steps"
    model.train()

    def state() -> dict[str, Any]:
        return {
            "step": step,
            "wall_s": round(wall_before + time.monotonic() - t0, 1),
            "recent_losses": losses[-200:],
        }

    bar = tqdm(
        total=settings.max_steps, initial=step, disable=not progress, desc="base-vlm", dynamic_ncols=True
    )
    try:
        while step < settings.max_steps:
            if stop["signal"]:
                status = stop["signal"]
                break
            if deadline is not None and time.monotonic() >= deadline:
                status = "minutes"
                break
            batch = collate(train_batch(step, settings, patch), tokenizer, n_latents, mean, std)
            lr = lr_at(step, settings)
            for g in optimizer.param_groups:
                g["lr"] = lr
            out_ = model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                pixel_attention_mask=batch.pixel_attention_mask,
                labels=batch.labels,
                use_cache=False,
            )
            loss = out_.loss
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {loss.item()} at step {step}; lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            with torch.no_grad():  # decoupled weight decay on matrices (AdamW's rule)
                for p, d in zip(model.parameters(), decayed):
                    if d:
                        p.mul_(1 - lr * settings.weight_decay)
            optimizer.step()
            step += 1
            losses.append(round(float(loss.item()), 4))
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{lr:.1e}")
            if step % settings.checkpoint_every == 0 and step < settings.max_steps:
                save_checkpoint(ckpt_dir, model, optimizer, state())
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        # Whatever stopped the loop (including an exception), keep what was learned.
        save_checkpoint(ckpt_dir, model, optimizer, state())
        export_folder(model, out / "vlm", init_dir)
    summary = {
        **{k: v for k, v in state().items() if k != "recent_losses"},
        "status": status,
        "max_steps": settings.max_steps,
        "loss_mean_last_100": round(float(np.mean(losses[-100:])), 4) if losses else None,
        "settings": asdict(settings),
        "n_latents": n_latents,
        "threads": torch.get_num_threads(),
    }
    (out / "train.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"stopped ({status}) at step {step}; wrote {out / 'vlm'}")
    return summary


# ------------------------------------------------------------------------------------------ check


def load_vlm(folder: str | Path):
    """(Idefics2ForConditionalGeneration float32 eval, tokenizer, mean, std) from a local folder."""
    from transformers import AutoTokenizer, Idefics2ForConditionalGeneration

    from ..encoder import check_vlm_folder

    folder = check_vlm_folder(folder)
    model = Idefics2ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mean, std = _image_stats(folder)
    return model, tokenizer, mean, std


@torch.no_grad()
def generate_captions(
    model, tokenizer, images: Sequence[Image.Image], mean, std, max_new_tokens: int = 80, batch_size: int = 64
) -> list[str]:
    """Greedy captions, through the model's own forward (every prompt has the same length: n_latents image
    tokens each, so a batch needs no padding)."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    n_latents = n_latents_of(model)
    dummy = Sample("crop", Image.new("RGB", (4, 4)), "", 1, {})
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        b = collate([dummy] * len(chunk), tokenizer, n_latents, mean, std, with_answer=False)
        px, pmask = pixels(chunk, mean, std)
        ids = b.input_ids
        done = torch.zeros(len(chunk), dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in chunk]
        for _ in range(max_new_tokens):
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=px,
                pixel_attention_mask=pmask,
                use_cache=False,
            ).logits[:, -1]
            nxt = logits.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == end_id or t == tokenizer.eos_token_id:
                        done[i] = True
                    else:
                        gen[i].append(t)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], 1)
        out += [tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]
    return out


# Eval-split indices for the check (the mini evaluation uses 0 .. 300_000, the demo 900_000+).
CHECK_BASE = 600_000


def check_samples(n: int, patch: int = 4) -> list[Sample]:
    """``n`` held-out samples of each kind (eval split); crops and style patches cycle through the budgets."""
    if n < 1:
        raise BaseVLMError(f"--n must be >= 1, got {n}")
    out: list[Sample] = []
    for k, kind in enumerate(KINDS):
        for i in range(n):
            index = CHECK_BASE + k * 100_000 + i
            rng = np.random.default_rng([index])
            s = make_sample(kind, "eval", index, rng, patch)
            if kind != "scene":  # balanced budgets rather than random ones
                tokens = REFERENCE_TOKENS[i % len(REFERENCE_TOKENS)]
                s = _with_tokens(kind, index, rng, tokens, patch)
            out.append(s)
    return out


def _with_tokens(kind: str, index: int, rng: np.random.Generator, tokens: int, patch: int) -> Sample:
    if kind == "crop":
        s = scene_at("eval", index)
        i = int(rng.integers(len(s.objects)))
        o = s.objects[i]
        img = prepare_image(object_crop(s, i), tokens, None, patch)
        return Sample(
            kind, img, crop_caption(o.colour, o.shape), tokens, {"colour": o.colour, "shape": o.shape}
        )
    s = scene_at("eval", index, require_style_box=True)
    img = prepare_image(style_reference(s), tokens, None, patch)
    return Sample(kind, img, style_caption(s.background.style), tokens, {"style": s.background.style})


def check(vlm: str | Path, n: int = 200, out_json: str | Path | None = None, log=print) -> dict[str, Any]:
    """Greedy captions of ``n`` held-out scenes, crops and style patches; accuracy per attribute."""
    if n < 1:
        raise BaseVLMError(f"--n must be >= 1, got {n}")
    model, tokenizer, mean, std = load_vlm(vlm)
    samples = check_samples(n, int(model.config.vision_config.patch_size))
    t0 = time.monotonic()
    captions = generate_captions(model, tokenizer, [s.image for s in samples], mean, std)
    scores = [score_caption(s.kind, c, s.truth) for s, c in zip(samples, captions)]
    acc: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        rows = [sc for s, sc in zip(samples, scores) if s.kind == kind]
        acc[kind] = {a: round(float(np.mean([r[a] for r in rows])), 4) for a in rows[0]}
    by_tokens: dict[str, dict[str, dict[str, float]]] = {}
    for kind in ("crop", "style"):
        by_tokens[kind] = {}
        for t in REFERENCE_TOKENS:
            rows = [sc for s, sc in zip(samples, scores) if s.kind == kind and s.tokens == t]
            if rows:
                by_tokens[kind][str(t)] = {a: round(float(np.mean([r[a] for r in rows])), 4) for a in rows[0]}
    examples = [
        {"kind": s.kind, "tokens": s.tokens, "truth": s.answer, "caption": c}
        for s, c in list(zip(samples, captions))[:: max(1, len(samples) // 24)]
    ]
    result = {
        "vlm": str(vlm),
        "n_per_kind": n,
        "split": "eval",
        "n_latents": n_latents_of(model),
        "accuracy": acc,
        "accuracy_by_tokens": by_tokens,
        "chance": {
            "scene": {"count": 0.5, "style": 1 / 3},
            "crop": {"colour": 1 / 6, "shape": 1 / 4, "object": 1 / 24},
            "style": {"style": 1 / 3},
        },
        "examples": examples,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    log(format_table(result))
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    attrs = ("count", "colour", "shape", "object", "style")
    lines = [
        f"caption accuracy on {result['n_per_kind']} held-out eval-split images per kind "
        f"(perceiver: {result['n_latents']} latents per image)",
        "| kind | " + " | ".join(attrs) + " |",
        "|---|" + "---|" * len(attrs),
    ]
    for kind, acc in result["accuracy"].items():
        lines.append(f"| {kind} | " + " | ".join(f"{acc[a]:.3f}" if a in acc else "" for a in attrs) + " |")
    for kind, per in result.get("accuracy_by_tokens", {}).items():
        for t, acc in per.items():
            lines.append(
                f"| {kind} @ {t} tok | "
                + " | ".join(f"{acc[a]:.3f}" if a in acc else "" for a in attrs)
                + " |"
            )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ ship


def ship(
    run: str | Path,
    dest: str | Path = SHIP_DIR,
    record: str | Path = SHIP_JSON,
    command: str = "python -m mumu_core.mini base-vlm train --out runs/vlm_base",
    n_check: int = 200,
    log=print,
) -> dict[str, Any]:
    """Copy ``run/vlm`` as float16 into ``dest``, run the check on the shipped copy, write ``record``."""
    from .demo import _hardware, file_hashes

    run, dest, record = Path(run), Path(dest), Path(record)
    src = run / "vlm"
    summary_file = run / "train.json"
    if not src.is_dir() or not summary_file.is_file():
        raise BaseVLMError(
            f"{run} is not a finished base-vlm run: it needs vlm/ and train.json "
            "(made by `python -m mumu_core.mini base-vlm train --out DIR`)"
        )
    summary = json.loads(summary_file.read_text())

    def write(tmp: Path) -> None:
        for p in sorted(src.iterdir()):
            if p.is_file():
                shutil.copy2(p, tmp / p.name)
        _cast_safetensors(tmp / "model.safetensors", torch.float16)

    _atomic_dir(dest, write)
    result = check(dest, n_check, log=log)
    meta = {
        "format": "MUMU-mini VLM base: Hugging Face Idefics2 folder (perceiver resampler in place)",
        "dtype": "float16",
        "command": command,
        "hardware": _hardware(),
        "wall_s": summary["wall_s"],
        "steps": summary["step"],
        "status": summary["status"],
        "threads": summary.get("threads"),
        "settings": summary["settings"],
        "loss_mean_last_100": summary.get("loss_mean_last_100"),
        "check": {
            k: result[k] for k in ("n_per_kind", "split", "n_latents", "accuracy", "accuracy_by_tokens")
        },
        "check_command": f"python -m mumu_core.mini base-vlm check --vlm {_rel(dest)} --n {n_check}",
        "files": file_hashes(dest),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, record)
    return meta


def verify_shipped(dest: str | Path = SHIP_DIR, record: str | Path = SHIP_JSON) -> dict[str, Any]:
    """Every file of the shipped folder against the sha256 in its record; returns the record."""
    from .demo import file_hashes

    dest, record = Path(dest), Path(record)
    if not record.is_file():
        raise BaseVLMError(
            f"{record} is missing: ship the base with `python -m mumu_core.mini base-vlm ship`"
        )
    meta = json.loads(record.read_text())
    actual = file_hashes(dest) if dest.is_dir() else {}
    if actual != meta["files"]:
        changed = sorted(k for k in set(actual) | set(meta["files"]) if actual.get(k) != meta["files"].get(k))
        raise BaseVLMError(
            f"{dest} does not match {record}: {changed} differ; restore them from git or re-ship"
        )
    return meta


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mumu_core.mini base-vlm {train,check,ship}``: the mini VLM base."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m mumu_core.mini base-vlm", description=plain(main.__doc__ or "")
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="pretrain (or resume) the mini Idefics2 to caption mini images")
    t.add_argument(
        "--out", type=Path, required=True, help="run folder (init/, checkpoint/, vlm/, train.json)"
    )
    t.add_argument("--minutes", type=float, default=None, help="wall-clock limit (saves, then stops)")
    t.add_argument("--max-steps", type=int, default=TrainSettings.max_steps)
    t.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    t.add_argument("--lr", type=float, default=TrainSettings.lr)
    t.add_argument("--warmup-steps", type=int, default=TrainSettings.warmup_steps)
    t.add_argument("--checkpoint-every", type=int, default=TrainSettings.checkpoint_every)
    t.add_argument("--seed", type=int, default=TrainSettings.seed)
    t.add_argument(
        "--kind-weights",
        type=float,
        nargs=3,
        default=TrainSettings.kind_weights,
        metavar=("SCENE", "CROP", "STYLE"),
        help="fractions of scenes / object crops / style patches per batch",
    )
    t.add_argument(
        "--init", type=Path, default=None, help="continue from this Idefics2 folder (e.g. RUN/vlm)"
    )
    t.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("check", help="greedy captions of held-out images: accuracy per attribute")
    c.add_argument("--vlm", type=Path, required=True, help="an Idefics2 folder (RUN/vlm or the shipped one)")
    c.add_argument("--n", type=int, default=200, help="images per kind (scene, crop, style)")
    c.add_argument("--out", type=Path, default=None, help="write the results json here")
    s = sub.add_parser("ship", help="copy RUN/vlm (float16) into mumu_core/mini/weights/base/vlm + its json")
    s.add_argument("--run", type=Path, required=True, help="the train --out folder")
    s.add_argument("--command", default=None, help="the exact training command (recorded)")
    s.add_argument("--n", type=int, default=200, help="images per kind for the check of the shipped copy")
    s.add_argument("--dest", type=Path, default=SHIP_DIR)
    s.add_argument("--record", type=Path, default=SHIP_JSON)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "train":
            settings = TrainSettings(
                batch_size=args.batch_size,
                lr=args.lr,
                warmup_steps=args.warmup_steps,
                max_steps=args.max_steps,
                checkpoint_every=args.checkpoint_every,
                seed=args.seed,
                kind_weights=tuple(args.kind_weights),
                init=str(args.init) if args.init is not None else None,
            )
            summary = train(args.out, settings, minutes=args.minutes, progress=not args.no_progress)
            print(json.dumps({k: v for k, v in summary.items() if k != "settings"}, indent=1))
        elif args.cmd == "check":
            check(args.vlm, args.n, args.out)
        else:
            command = args.command or (
                f"OMP_NUM_THREADS=1 python -m mumu_core.mini base-vlm train --out {args.run} (see train.json)"
            )
            meta = ship(args.run, args.dest, args.record, command=command, n_check=args.n)
            print(json.dumps({k: v for k, v in meta.items() if k not in ("files", "settings")}, indent=1))
    except (BaseVLMError, FileNotFoundError) as e:  # FileNotFoundError: EncoderLoadError (missing folder)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "KINDS",
    "REFERENCE_TOKENS",
    "BaseVLMError",
    "ParsedCaption",
    "TrainSettings",
    "check",
    "parse_caption",
    "scene_caption",
    "score_caption",
    "ship",
    "train",
    "verify_shipped",
]
