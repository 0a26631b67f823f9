"""PickScore (Kirstain et al. 2023): how much people prefer an image for a prompt.

The published model is a CLIP-H fine-tune (``yuvalkirstain/PickScore_v1``) read with the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; both are plain transformers ``CLIPModel`` / ``CLIPProcessor``
folders, loaded here from local paths only (safetensors, no remote code). The score of an image for a
prompt is ``exp(logit_scale) * cosine(image embedding, prompt embedding)``, as in the reference code;
PickScore_v1's scale is 100, so real scores sit around 18-23.

API (shared by ``synth``, ``score`` and the real-photo ``curate`` command)::

    scorer = PickScorer.from_pretrained("models/PickScore_v1", processor="models/CLIP-ViT-H-14")
    scores = scorer.score(images, prompts)  # list[float], one per (image, prompt) pair
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

PICKSCORE_HELP = (
    "a transformers CLIPModel folder (config.json with model_type 'clip' + model.safetensors), e.g. "
    "yuvalkirstain/PickScore_v1, and a CLIPProcessor folder (preprocessor_config.json + tokenizer files), "
    "e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the model folder itself when it holds both)"
)


class ScorerLoadError(ValueError):
    """The PickScore folder is missing or holds another kind of model; the message says what belongs."""


def config_model_type(folder: Path, error: type[ValueError], what: str, help_text: str) -> str | None:
    """``model_type`` of a transformers folder's config.json; ``error`` names the folder when it has none."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise error(f"{what} folder {folder} has no config.json: put {help_text} there")
    try:
        return json.loads(cfg.read_text("utf-8")).get("model_type")
    except ValueError as e:
        raise error(f"{cfg} is not valid JSON ({e}): re-download the {what} folder") from e


def check_clip_folder(folder: str | Path, what: str = "PickScore model") -> Path:
    """Cheap checks (no weights read): the folder exists and its config.json is a CLIP model's."""
    folder = Path(folder)
    model_type = config_model_type(folder, ScorerLoadError, what, PICKSCORE_HELP)
    if model_type != "clip":
        raise ScorerLoadError(
            f"{folder} holds a {model_type!r} model, not a CLIP model: give {PICKSCORE_HELP}"
        )
    if not any(folder.glob("*.safetensors")):
        raise ScorerLoadError(
            f"{folder} has no .safetensors weights (pickled .bin files are never loaded): "
            "convert them or use the repository's model.safetensors"
        )
    return folder


def check_processor_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if (
        not (folder / "preprocessor_config.json").is_file()
        and not (folder / "processor_config.json").is_file()
    ):
        raise ScorerLoadError(
            f"PickScore processor folder {folder} has no preprocessor_config.json: give {PICKSCORE_HELP}"
        )
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise ScorerLoadError(
            f"PickScore processor folder {folder} has no tokenizer files: give {PICKSCORE_HELP}"
        )
    return folder


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class PickScorer:
    """A loaded PickScore model and its processor; ``score`` is batched and gradient-free."""

    def __init__(self, model, processor, device: str = "cpu", batch_size: int = 16, identity: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.batch_size = int(batch_size)
        self.identity = identity  # recorded in every scored record ("PickScore_v1", a path's name)
        self.max_text_tokens = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        processor: str | Path | None = None,
        device: str = "auto",
        dtype: torch.dtype | str = "auto",
        batch_size: int = 16,
    ) -> PickScorer:
        """Load a CLIPModel from ``folder`` and a CLIPProcessor from ``processor`` (default: ``folder``).

        ``dtype="auto"``: float16 on CUDA, float32 on CPU.
        """
        from transformers import CLIPModel, CLIPProcessor

        folder = check_clip_folder(folder)
        proc_dir = check_processor_folder(processor if processor is not None else folder)
        device = resolve_device(device)
        if dtype == "auto":
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        try:
            model = CLIPModel.from_pretrained(
                folder, dtype=dtype, use_safetensors=True, local_files_only=True
            )
            proc = CLIPProcessor.from_pretrained(proc_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ScorerLoadError(f"cannot load PickScore from {folder} / {proc_dir}: {e}") from e
        return cls(model.to(device), proc, device, batch_size, identity=folder.name)

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """PickScore of ``images[i]`` for ``prompts[i]``; prompts longer than the text model are truncated."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        out: list[float] = []
        dtype = next(self.model.parameters()).dtype
        scale = self.model.logit_scale.exp().float()
        for s in range(0, len(images), self.batch_size):
            imgs = [im.convert("RGB") for im in images[s : s + self.batch_size]]
            inputs = self.processor(
                text=list(prompts[s : s + self.batch_size]),
                images=imgs,
                padding=True,
                truncation=True,
                max_length=self.max_text_tokens,
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            # The full forward returns normalised embeddings of both towers.
            res = self.model(**inputs)
            cos = (res.image_embeds.float() * res.text_embeds.float()).sum(-1)
            out.extend((scale * cos).cpu().tolist())
        return out


def histogram_png(
    scores: Sequence[float],
    threshold: float | None,
    path: str | Path,
    title: str = "PickScore",
    bins: int = 40,
) -> Path:
    """A bar chart of ``scores`` (kept bars blue, dropped grey) with the threshold as a red line.

    Drawn with PIL (no plotting library needed); written atomically.
    """
    import io

    import numpy as np
    from PIL import ImageDraw

    from .shards import write_bytes_atomic

    w, h, left, bottom, top = 720, 360, 50, 40, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    vals = np.asarray([s for s in scores if np.isfinite(s)], dtype=np.float64)
    if threshold is not None and not np.isfinite(threshold):
        threshold = None  # -inf keeps everything: no line to draw
    kept = int((vals >= threshold).sum()) if threshold is not None else len(vals)
    frac = f"{kept}/{len(vals)} kept ({100.0 * kept / max(1, len(vals)):.1f} %)"
    thr = f" at >= {threshold:g}" if threshold is not None else " (no threshold)"
    d.text((left, 10), f"{title}: {frac}{thr}", fill="black")
    if len(vals):
        lo, hi = float(vals.min()), float(vals.max())
        if threshold is not None:
            lo, hi = min(lo, threshold), max(hi, threshold)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(vals, bins=bins, range=(lo, hi))
        plot_w, plot_h = w - 2 * left, h - top - bottom
        bw = plot_w / bins

        def x_of(v: float) -> float:
            return left + (v - lo) / (hi - lo) * plot_w

        for i, c in enumerate(counts):
            if c == 0:
                continue
            y0 = h - bottom - c / counts.max() * plot_h
            colour = "steelblue" if threshold is None or edges[i] >= threshold else "gray"
            d.rectangle([left + i * bw + 1, y0, left + (i + 1) * bw - 1, h - bottom], fill=colour)
        d.line([left, h - bottom, w - left, h - bottom], fill="black")
        for v in np.linspace(lo, hi, 6):
            d.text((x_of(v) - 12, h - bottom + 6), f"{v:.1f}", fill="black")
        d.text((left - 40, top - 14), f"max {int(counts.max())}", fill="black")
        if threshold is not None:
            x = x_of(threshold)
            d.line([x, top - 4, x, h - bottom], fill="red", width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)
