"""Open-vocabulary detection with GroundingDINO (transformers) and the boxes -> spans post-processing.

We do not use ``GroundingDinoProcessor.post_process_grounded_object_detection``: it returns decoded
label *strings*, which loses which caption phrase (and so which character span) a box belongs to,
and merges repeated words. Instead the detector text is built here from the phrases
("man . dog ."), the tokenizer's offset mapping tells which tokens belong to which phrase, and
``assign_boxes`` picks one box per phrase (see its docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

log = logging.getLogger(__name__)

_DETECTOR_FILES_HINT = (
    "a Hugging Face GroundingDINO folder: config.json (model_type 'grounding-dino'), model.safetensors, "
    "preprocessor_config.json and the BERT tokenizer files (e.g. IDEA-Research/grounding-dino-tiny or "
    "-base, downloaded elsewhere with `hf download IDEA-Research/grounding-dino-tiny --local-dir DIR`)"
)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def detector_text(phrases: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """GroundingDINO's text format ("man . red car .", lower case) and each phrase's char range in it."""
    parts, ranges, pos = [], [], 0
    for p in phrases:
        p = " ".join(p.lower().split())
        if not p:
            raise ValueError("empty phrase sent to the detector")
        ranges.append((pos, pos + len(p)))
        parts.append(p + " .")
        pos += len(p) + 3
    return " ".join(parts), ranges


def token_phrase_map(offsets: Sequence[Sequence[int]], ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """For each token, the index of the phrase whose characters it covers, or -1 (specials, dots)."""
    out = torch.full((len(offsets),), -1, dtype=torch.long)
    for t, (s, e) in enumerate(offsets):
        if e <= s:  # special tokens have (0, 0)
            continue
        for p, (ps, pe) in enumerate(ranges):
            if s >= ps and e <= pe:
                out[t] = p
                break
    return out


def assign_boxes(
    probs: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    token_phrase: torch.Tensor,
    n_phrases: int,
    width: int,
    height: int,
) -> list[tuple[list[float], float] | None]:
    """Pick one box per phrase from GroundingDINO's per-query token probabilities.

    ``probs``: (Q, T) sigmoid of the logits, ``boxes_cxcywh``: (Q, 4) normalised to the image,
    ``token_phrase``: (T,) phrase index per token (-1 = none). The phrase score of a query is the
    max probability over the phrase's tokens (GroundingDINO's own box score, restricted to that
    phrase). Each query belongs to the phrase it scores highest on, so two phrases do not grab the
    same box; a phrase takes its best-scoring own query, or, when it owns none, its best query
    overall (that box is usually a weak match and the threshold rule drops it, with its score
    recorded). Returns per phrase ``([x0, y0, x1, y1] pixels, score)`` or None when the phrase has
    no token left (truncated text).
    """
    q = probs.shape[0]
    probs = probs.float()
    scores = torch.full((q, n_phrases), -1.0)
    present = []
    for p in range(n_phrases):
        cols = (token_phrase[: probs.shape[1]] == p).nonzero(as_tuple=True)[0]
        present.append(len(cols) > 0)
        if len(cols):
            scores[:, p] = probs[:, cols].max(dim=1).values
    owner = scores.argmax(dim=1)
    b = boxes_cxcywh.float()
    xyxy = torch.stack(
        [
            (b[:, 0] - b[:, 2] / 2) * width,
            (b[:, 1] - b[:, 3] / 2) * height,
            (b[:, 0] + b[:, 2] / 2) * width,
            (b[:, 1] + b[:, 3] / 2) * height,
        ],
        dim=1,
    )
    out: list[tuple[list[float], float] | None] = []
    for p in range(n_phrases):
        if not present[p]:
            out.append(None)
            continue
        own = (owner == p).nonzero(as_tuple=True)[0]
        pool = own if len(own) else torch.arange(q)
        best = pool[scores[pool, p].argmax()]
        out.append(([float(v) for v in xyxy[best]], float(scores[best, p])))
    return out


class GroundingDinoDetector:
    """Batched phrase grounding with ``GroundingDinoForObjectDetection`` from a local folder."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor = processor
        self.device = device
        self.dtype = dtype
        self.max_text_len = int(model.config.max_text_len)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str = "auto", dtype: str = "float32"
    ) -> GroundingDinoDetector:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        folder = Path(folder)
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no GroundingDINO model at {folder}: expected {_DETECTOR_FILES_HINT}")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{folder} has no *.safetensors weights (pickled .bin files are not loaded): "
                f"expected {_DETECTOR_FILES_HINT}"
            )
        model = GroundingDinoForObjectDetection.from_pretrained(folder, use_safetensors=True)
        if model.config.model_type != "grounding-dino":
            raise ValueError(f"{cfg_file} is a {model.config.model_type!r} model, expected 'grounding-dino'")
        processor = GroundingDinoProcessor.from_pretrained(folder)
        return cls(model, processor, resolve_device(device), resolve_dtype(dtype))

    @torch.inference_mode()
    def detect(
        self, images: Sequence[Image.Image], phrase_lists: Sequence[Sequence[str]]
    ) -> list[list[tuple[list[float], float] | None]]:
        """One forward pass for the batch; per image, per phrase: ``(box xyxy px, score)`` or None.

        Images with no phrases are not sent to the model and get an empty list.
        """
        if len(images) != len(phrase_lists):
            raise ValueError(f"{len(images)} images but {len(phrase_lists)} phrase lists")
        results: list[list] = [[] for _ in images]
        todo = [i for i, ph in enumerate(phrase_lists) if len(ph)]
        if not todo:
            return results
        texts, ranges = zip(*(detector_text(phrase_lists[i]) for i in todo), strict=True)
        enc = self.processor.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        offsets = enc.pop("offset_mapping")
        pix = self.processor.image_processor([images[i].convert("RGB") for i in todo], return_tensors="pt")
        out = self.model(
            pixel_values=pix["pixel_values"].to(self.device, self.dtype),
            pixel_mask=pix["pixel_mask"].to(self.device),
            input_ids=enc["input_ids"].to(self.device),
            attention_mask=enc["attention_mask"].to(self.device),
            token_type_ids=enc["token_type_ids"].to(self.device),
        )
        probs = out.logits.float().sigmoid().cpu()
        boxes = out.pred_boxes.float().cpu()
        for j, i in enumerate(todo):
            tmap = token_phrase_map(offsets[j].tolist(), ranges[j])
            n = len(phrase_lists[i])
            got = assign_boxes(probs[j], boxes[j], tmap, n, *images[i].size)
            dropped = sum(g is None for g in got)
            if dropped:
                log.warning(
                    "detector text truncated at %d tokens: %d phrase(s) of image %d not grounded",
                    self.max_text_len,
                    dropped,
                    i,
                )
            results[i] = got
        return results
