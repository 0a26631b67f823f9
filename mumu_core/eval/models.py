"""Metric models loaded from local folders: CLIP, DINO (ViT-S/16) and GroundingDINO.

Nothing here downloads: every loader takes a local folder, checks that the files that belong there
are present, and says which model to put there when they are not. ``trust_remote_code`` stays off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

Box = tuple[float, float, float, float]


class ModelFolderError(FileNotFoundError):
    """A metric model folder is missing or incomplete; the message says what belongs there."""


# Hub folders carry preprocessor_config.json; transformers 5's save_pretrained of a processor writes
# processor_config.json instead. Either one describes the preprocessing.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_folder(
    folder: str | Path, what: str, needs: Sequence[str | tuple[str, ...]] = ("config.json", PROCESSOR_FILES)
) -> Path:
    """``needs``: file names, or tuples of alternatives of which one must exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{what} folder {folder} does not exist: put a local copy of the model there")
    alts = [(n,) if isinstance(n, str) else n for n in needs]
    missing = [" or ".join(a) for a in alts if not any((folder / n).is_file() for n in a)]
    if missing:
        raise ModelFolderError(
            f"{what} folder {folder} lacks {missing}: it must be a Hugging Face model folder"
        )
    if not any(folder.glob("*.safetensors")):
        raise ModelFolderError(
            f"{what} folder {folder} has no .safetensors weights: only safetensors are loaded (never pickles); "
            "convert the checkpoint or download the safetensors variant"
        )
    return folder


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older
    # versions returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


class ClipScorer:
    """CLIP image and text embeddings (CLIPModel + its processor from one local folder)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        from transformers import AutoProcessor, CLIPModel

        folder = check_folder(folder, "CLIP")
        self.name = str(folder)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)
        if (
            getattr(self.processor, "tokenizer", None) is None
            or getattr(self.processor, "image_processor", None) is None
        ):
            raise ModelFolderError(
                f"CLIP folder {folder} needs both tokenizer files and preprocessor_config.json"
            )
        self.max_text_len = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor.image_processor(
                images=list(images[i : i + self.batch_size]), return_tensors="pt"
            )
            outs.append(
                _features(self.model.get_image_features(pixel_values=px["pixel_values"].to(self.device)))
            )
        return torch.cat(outs).float().cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        # CLIP's text tower has a fixed context (77 tokens); longer prompts are truncated, as in CLIPScore.
        tok = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt"
        )
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return _features(self.model.get_text_features(**tok)).float().cpu()


class DinoScorer:
    """DINO ViT-S/16 (facebook/dino-vits16, a ViTModel): the CLS token of the last layer, as DreamBench."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        from transformers import AutoImageProcessor, ViTModel

        folder = check_folder(folder, "DINO")
        self.name = str(folder)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = ViTModel.from_pretrained(folder, add_pooling_layer=False, use_safetensors=True)
        self.model = self.model.to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(folder)

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        outs = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[i : i + self.batch_size]), return_tensors="pt")
            hidden = self.model(pixel_values=px["pixel_values"].to(self.device)).last_hidden_state
            outs.append(hidden[:, 0])
        return torch.cat(outs).float().cpu()


@dataclass(frozen=True)
class Detection:
    box: Box  # pixel [x0, y0, x1, y1] in the image given
    score: float
    label: str


class GroundingDetector:
    """Open-vocabulary boxes from GroundingDINO (GroundingDinoForObjectDetection + processor)."""

    def __init__(
        self,
        folder: str | Path,
        device: str | torch.device = "cpu",
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
    ) -> None:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        folder = check_folder(folder, "GroundingDINO")
        self.name = str(folder)
        self.device = torch.device(device)
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.model = GroundingDinoForObjectDetection.from_pretrained(folder, use_safetensors=True)
        self.model = self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(folder)

    @torch.no_grad()
    def detect(self, image: Image.Image, phrase: str) -> list[Detection]:
        """Boxes for one phrase, best score first, above the box threshold."""
        # GroundingDINO expects lower-case phrases each ending with a period.
        text = phrase.strip().lower().rstrip(".") + " ."
        inputs = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        out = self.model(**inputs)
        res = self.processor.post_process_grounded_object_detection(
            out,
            inputs["input_ids"],
            threshold=self.box_threshold,
            text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        dets = []
        # "labels" is deprecated in favour of "text_labels" (and warns when read).
        labels = res["text_labels"] if "text_labels" in res else res["labels"]
        for box, score, label in zip(res["boxes"].tolist(), res["scores"].tolist(), labels):
            x0, y0, x1, y1 = (
                max(0.0, box[0]),
                max(0.0, box[1]),
                min(float(image.width), box[2]),
                min(float(image.height), box[3]),
            )
            if x1 - x0 >= 1 and y1 - y0 >= 1:
                dets.append(Detection((x0, y0, x1, y1), float(score), str(label)))
        dets.sort(key=lambda d: -d.score)
        return dets


def crop(image: Image.Image, box: Box) -> Image.Image:
    x0, y0, x1, y1 = (round(v) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, max(x1, x0 + 1)), min(image.height, max(y1, y0 + 1))
    return image.crop((x0, y0, x1, y1))
