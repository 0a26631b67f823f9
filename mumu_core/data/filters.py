"""The real-photo filters of ``curate`` (docs/DATA.md "Curating real photos"), cheapest first.

- ``read_header`` / ``decode_photo``: bytes -> size/format without decoding, then an upright RGB image.
  Every bad input gets a reason: ``empty_file``, ``not_an_image``, ``unsupported_format``,
  ``too_many_pixels`` (checked from the header, before any pixel is decoded), ``truncated``.
  CMYK, palette, grey+alpha and 16-bit images are converted (16-bit is scaled to 8 bits, not clipped).
- ``resolution_reason``: shorter side, megapixels, aspect ratio (from the header: no decode needed).
- ``ImageClassifier``: SFW / watermark, any transformers ``AutoModelForImageClassification`` folder; the
  score is the summed probability of the configured labels.
- ``PeopleDetector``: persons with a transformers closed-set detector (``AutoModelForObjectDetection``:
  RT-DETR, DETR, YOLOS, ...) or GroundingDINO prompted with "person" (the bootstrap's detector).
- ``person_crop_box``: the largest crop of a bucketed aspect that contains the person, centred on it.
- ``LlavaCaptioner``: LLaVA 1.6 (``LlavaNextForConditionalGeneration`` + ``LlavaNextProcessor``), batched.

Every model loads from a local folder with safetensors weights only (``use_safetensors``, no remote code).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .detect import detector_text, resolve_device, resolve_dtype, token_phrase_map

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "BMP")


class BadImage(Exception):
    """An input that cannot become a photo; ``reason`` is one of the curate reasons."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class Header:
    width: int  # as stored (before EXIF rotation; the filters below do not depend on orientation)
    height: int
    format: str
    mode: str


def read_header(data: bytes, max_pixels: int, formats: Sequence[str] = ALLOWED_FORMATS) -> Header:
    """Size, format and mode from the header only; raises ``BadImage`` before any pixel is decoded."""
    if not data:
        raise BadImage("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too_many_pixels", str(e)) from e
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct errors, ...
        raise BadImage("not_an_image", f"{type(e).__name__}: {e}") from e
    if im.format not in formats:
        raise BadImage("unsupported_format", f"{im.format} (allowed: {', '.join(formats)})")
    w, h = im.size
    if w * h > max_pixels:
        raise BadImage("too_many_pixels", f"{w}x{h} = {w * h / 1e6:.0f} MP > {max_pixels / 1e6:.0f} MP")
    return Header(w, h, im.format, im.mode)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey: PIL's convert("RGB") clips at 255 (a white image); scale to 8 bits instead.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "I" or arr.max() > 255 else 255.0
        grey = np.clip(np.round(arr * 255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        raise BadImage("unsupported_format", "32-bit float pixels (mode F) have no defined 0..255 range")
    return im.convert("RGB")  # RGB, L, P, LA, RGBA, CMYK, YCbCr (alpha dropped, as the bootstrap does)


def decode_photo(data: bytes) -> Image.Image:
    """Fully decode (a truncated file fails here), apply EXIF orientation, convert to 8-bit RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, ...
        raise BadImage("truncated", f"{type(e).__name__}: {e}") from e
    if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: 1 = upright
        im = ImageOps.exif_transpose(im)
    return _to_rgb(im)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def resolution_scores(width: int, height: int) -> dict[str, float]:
    short, long = min(width, height), max(width, height)
    return {
        "short_side": float(short),
        "megapixels": round(width * height / 1e6, 4),
        "aspect": round(long / max(1, short), 4),
    }


def resolution_reason(
    scores: dict[str, float], min_short_side: int, min_megapixels: float, max_aspect: float
) -> tuple[str, float] | None:
    """The first resolution rule the image fails, with its score, or None."""
    if scores["short_side"] < min_short_side:
        return "short_side", scores["short_side"]
    if scores["megapixels"] < min_megapixels:
        return "megapixels", scores["megapixels"]
    if scores["aspect"] > max_aspect:
        return "aspect", scores["aspect"]
    return None


# --------------------------------------------------------------------------------------------------
# Model folders


def check_model_folder(folder: str | Path | None, what: str, hint: str) -> Path:
    """A local HF folder with config.json and safetensors weights, else an error naming what belongs."""
    if not folder:
        raise ValueError(f"the {what} needs a local model folder: {hint}")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no {what} at {folder}: expected a Hugging Face folder with config.json, {hint}"
        )
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights (pickled .bin files are never loaded): {hint}"
        )
    return folder


def load_or_explain(what: str, folder: Path, hint: str, load):
    """``load()``, with a load failure (wrong model type, missing files) named with what belongs."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"cannot load the {what} from {folder} ({str(e).splitlines()[0][:200]}): expected {hint}"
        ) from e


def folder_identity(folder: Path, cls_name: str) -> dict:
    """What identifies a model folder without hashing gigabytes: its config hash and weight file sizes."""
    cfg = (folder / "config.json").read_bytes()
    weights = sorted((p.name, p.stat().st_size) for p in folder.glob("*.safetensors"))
    return {
        "class": cls_name,
        "folder": folder.name,
        "name_or_path": json.loads(cfg).get("_name_or_path") or folder.name,
        "config_sha256": hashlib.sha256(cfg).hexdigest()[:16],
        "weights": hashlib.sha256(json.dumps(weights).encode()).hexdigest()[:16],
    }


def _norm_label(s: str) -> str:
    return "_".join(str(s).lower().replace("-", " ").replace("_", " ").split())


def _label_ids(config, wanted: Sequence[str], folder: Path, what: str) -> list[int]:
    labels = {int(i): _norm_label(n) for i, n in config.id2label.items()}
    want = {_norm_label(w) for w in wanted}
    ids = sorted(i for i, n in labels.items() if n in want)
    missing = want - set(labels.values())
    if missing:
        raise ValueError(
            f"{what} {folder} has labels {sorted(set(labels.values()))}, not {sorted(missing)}: "
            f"name the labels to act on with --{what.split()[0]}-labels"
        )
    return ids


CLASSIFIER_HINT = (
    "config.json, model.safetensors and preprocessor_config.json of an AutoModelForImageClassification "
    "model (SFW: Falconsai/nsfw_image_detection; watermark: prithivMLmods/Watermark-Detection-SigLIP2), "
    "fetched elsewhere with `hf download REPO --local-dir DIR`"
)
DETECTOR_HINT = (
    "config.json, model.safetensors and preprocessor_config.json of an AutoModelForObjectDetection model "
    "with a 'person' label (PekingU/rtdetr_r50vd_coco_o365) or a GroundingDINO folder "
    "(IDEA-Research/grounding-dino-base)"
)
LLAVA_HINT = (
    "a LLaVA 1.6 folder: config.json (model_type 'llava_next'), *.safetensors, processor_config.json / "
    "preprocessor_config.json, tokenizer files and a chat template (llava-hf/llava-v1.6-mistral-7b-hf)"
)


class ImageClassifier:
    """An image classifier; ``score(images)`` = summed softmax probability of the target labels."""

    def __init__(self, model, processor, target_ids: list[int], device, dtype, identity: dict):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.target_ids = processor, target_ids
        self.device, self.dtype, self.identity = device, dtype, identity

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        labels: Sequence[str],
        what: str,
        device: str = "auto",
        dtype: str = "float32",
    ) -> ImageClassifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        folder = check_model_folder(folder, what, CLASSIFIER_HINT)
        model = load_or_explain(
            what,
            folder,
            CLASSIFIER_HINT,
            lambda: AutoModelForImageClassification.from_pretrained(
                folder, use_safetensors=True, local_files_only=True
            ),
        )
        ids = _label_ids(model.config, labels, folder, what)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        ident = folder_identity(folder, type(model).__name__) | {
            "labels": [model.config.id2label[i] for i in ids]
        }
        return cls(model, processor, ids, resolve_device(device), resolve_dtype(dtype), ident)

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image]) -> list[float]:
        if not images:
            return []
        pix = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        logits = self.model(pixel_values=pix.to(self.device, self.dtype)).logits.float()
        return logits.softmax(-1)[:, self.target_ids].sum(-1).cpu().tolist()


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression (class-agnostic); indices kept, best first."""
    order = scores.argsort(descending=True).tolist()
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            x0 = torch.maximum(boxes[i, 0], boxes[j, 0])
            y0 = torch.maximum(boxes[i, 1], boxes[j, 1])
            x1 = torch.minimum(boxes[i, 2], boxes[j, 2])
            y1 = torch.minimum(boxes[i, 3], boxes[j, 3])
            inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
            area = lambda b: (b[2] - b[0]).clamp(min=0) * (b[3] - b[1]).clamp(min=0)  # noqa: E731
            union = area(boxes[i]) + area(boxes[j]) - inter
            if union > 0 and inter / union > iou:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@dataclass
class People:
    """Persons found in one image: boxes (xyxy px of the image given) and scores, best first."""

    boxes: list[list[float]]
    scores: list[float]

    @property
    def count(self) -> int:
        return len(self.boxes)


class PeopleDetector:
    """Counts persons: a closed-set detector's ``person`` class, or GroundingDINO prompted "person"."""

    def __init__(self, model, processor, kind: str, person_ids, device, dtype, identity, threshold, nms_iou):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.kind, self.person_ids = processor, kind, person_ids
        self.device, self.dtype, self.identity = device, dtype, identity
        self.threshold, self.nms_iou = threshold, nms_iou

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        labels: Sequence[str] = ("person",),
        threshold: float = 0.5,
        nms_iou: float = 0.7,
        device: str = "auto",
        dtype: str = "float32",
    ) -> PeopleDetector:
        from transformers import AutoConfig

        folder = check_model_folder(folder, "people detector", DETECTOR_HINT)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type == "grounding-dino":
            from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

            model = GroundingDinoForObjectDetection.from_pretrained(folder, use_safetensors=True)
            processor = GroundingDinoProcessor.from_pretrained(folder)
            kind, ids = "grounding-dino", list(labels)
        else:
            from transformers import AutoImageProcessor, AutoModelForObjectDetection

            model = load_or_explain(
                "people detector",
                folder,
                DETECTOR_HINT,
                lambda: AutoModelForObjectDetection.from_pretrained(
                    folder, use_safetensors=True, local_files_only=True
                ),
            )
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
            kind, ids = "closed-set", _label_ids(model.config, labels, folder, "people detector")
        ident = folder_identity(folder, type(model).__name__)
        return cls(
            model,
            processor,
            kind,
            ids,
            resolve_device(device),
            resolve_dtype(dtype),
            ident,
            threshold,
            nms_iou,
        )

    @torch.inference_mode()
    def detect(self, images: Sequence[Image.Image], threshold: float | None = None) -> list[People]:
        """Persons with score > ``threshold`` (default: the one given at load time), after NMS."""
        if not images:
            return []
        threshold = self.threshold if threshold is None else threshold
        if self.kind == "grounding-dino":
            raw = self._grounded(images, threshold)
        else:
            pix = self.processor(images=list(images), return_tensors="pt")
            out = self.model(pixel_values=pix["pixel_values"].to(self.device, self.dtype))
            out.logits, out.pred_boxes = out.logits.float(), out.pred_boxes.float()
            res = self.processor.post_process_object_detection(
                out, threshold=threshold, target_sizes=[(im.height, im.width) for im in images]
            )
            raw = []
            for r in res:
                m = torch.isin(r["labels"].cpu(), torch.tensor(self.person_ids))
                raw.append((r["boxes"].cpu()[m], r["scores"].cpu()[m]))
        found = []
        for boxes, scores in raw:
            keep = nms(boxes, scores, self.nms_iou)
            found.append(
                People([[float(v) for v in boxes[k]] for k in keep], [float(scores[k]) for k in keep])
            )
        return found

    def _grounded(
        self, images: Sequence[Image.Image], threshold: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """GroundingDINO with the text "person .": a query's score is its max over the phrase's tokens."""
        text, ranges = detector_text(self.person_ids)
        enc = self.processor.tokenizer(
            [text] * len(images), return_offsets_mapping=True, return_token_type_ids=True, return_tensors="pt"
        )
        offsets = enc.pop("offset_mapping")
        pix = self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model(
            pixel_values=pix["pixel_values"].to(self.device, self.dtype),
            pixel_mask=pix["pixel_mask"].to(self.device),
            **{k: v.to(self.device) for k, v in enc.items()},
        )
        tmap = token_phrase_map(offsets[0].tolist(), ranges)
        cols = (tmap >= 0).nonzero(as_tuple=True)[0]
        probs = out.logits.float().sigmoid().cpu()[:, :, cols].max(-1).values  # (B, Q)
        res = []
        for b, im in enumerate(images):
            cx, cy, w, h = out.pred_boxes[b].float().cpu().unbind(-1)
            xyxy = torch.stack(
                [
                    (cx - w / 2) * im.width,
                    (cy - h / 2) * im.height,
                    (cx + w / 2) * im.width,
                    (cy + h / 2) * im.height,
                ],
                -1,
            )
            m = probs[b] > threshold
            res.append((xyxy[m], probs[b][m]))
        return res


# --------------------------------------------------------------------------------------------------
# Person-centred crop


def _fit(width: int, height: int, aspect: float) -> tuple[int, int]:
    """The largest (w, h) with w / h = aspect inside width x height."""
    if width / height >= aspect:
        return min(width, max(1, round(height * aspect))), height
    return width, min(height, max(1, round(width / aspect)))


def person_crop_box(
    width: int, height: int, person: Sequence[float] | None, aspects: Sequence[float] = (1.0,)
) -> tuple[list[int], bool]:
    """The crop ``[x0, y0, x1, y1]`` and whether it contains the whole person box.

    The aspect is the bucket nearest (in log ratio) to the image's own; the crop is the largest of
    that aspect in the image, centred on the person (or the image centre) and shifted inside the
    image. A person taller than the crop keeps the top of their box (the head) in it.
    """
    aspect = min(aspects, key=lambda a: abs(math.log(a) - math.log(width / height)))
    w, h = _fit(width, height, aspect)
    if person is None:
        cx, cy = width / 2, height / 2
    else:
        cx, cy = (person[0] + person[2]) / 2, (person[1] + person[3]) / 2
    x0 = min(max(0, round(cx - w / 2)), width - w)
    y0 = min(max(0, round(cy - h / 2)), height - h)
    if person is not None and person[3] - person[1] > h:
        y0 = min(max(0, math.floor(person[1])), height - h)
    box = [x0, y0, x0 + w, y0 + h]
    inside = person is not None and (
        person[0] >= x0 - 0.5
        and person[1] >= y0 - 0.5
        and person[2] <= x0 + w + 0.5
        and person[3] <= y0 + h + 0.5
    )
    return box, inside


# --------------------------------------------------------------------------------------------------
# Captions


class LlavaCaptioner:
    """LLaVA 1.6 captions, greedy and batched (left padding), one chat turn: image + ``prompt``."""

    def __init__(self, model, processor, prompt: str, max_new_tokens: int, device, dtype, identity: dict):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.prompt, self.max_new_tokens = processor, prompt, max_new_tokens
        self.device, self.dtype = device, dtype
        self.identity = identity | {"prompt": prompt, "max_new_tokens": max_new_tokens}
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        self.text = processor.apply_chat_template(conv, add_generation_prompt=True)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        prompt: str,
        max_new_tokens: int,
        device: str = "auto",
        dtype: str = "float32",
    ) -> LlavaCaptioner:
        from transformers import AutoConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

        folder = check_model_folder(folder, "caption model", LLAVA_HINT)
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        if config.model_type != "llava_next":
            raise ValueError(
                f"{folder} holds a {config.model_type!r} model, not LLaVA 1.6: give {LLAVA_HINT}"
            )
        processor = LlavaNextProcessor.from_pretrained(folder, local_files_only=True)
        if not getattr(processor, "chat_template", None) and not getattr(
            processor.tokenizer, "chat_template", None
        ):
            raise ValueError(
                f"{folder} has no chat template (chat_template.json / tokenizer_config.json): {LLAVA_HINT}"
            )
        processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
        model = load_or_explain(
            "caption model",
            folder,
            LLAVA_HINT,
            lambda: LlavaNextForConditionalGeneration.from_pretrained(
                folder, dtype=resolve_dtype(dtype), use_safetensors=True, local_files_only=True
            ),
        )
        ident = folder_identity(folder, type(model).__name__)
        return cls(
            model, processor, prompt, max_new_tokens, resolve_device(device), resolve_dtype(dtype), ident
        )

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        if not images:
            return []
        enc = self.processor(
            images=list(images), text=[self.text] * len(images), padding=True, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]
