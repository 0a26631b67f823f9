"""Configuration of dataset bootstrapping (one dataclass, validated once, shared by every executor)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

KNOWN_CONTROLS = ("canny", "depth", "sketch")


@dataclass
class BootstrapConfig:
    """Every knob of the bootstrap. Defaults are the paper's rules (MUMU, section 3.1).

    The crop-size rules are configurable because the mini world (issue 6) renders small canvases
    where a 150 px minimum would drop everything.
    """

    # --- the paper's crop rules ---
    min_crop_side: int = 150  # a crop narrower OR shorter than this is dropped ("too_small")
    max_crop_area_frac: float = 0.75  # a crop covering MORE than this fraction of the image is dropped
    max_crops: int = 3  # at most this many crops per prompt, highest score first ("over_limit")
    duplicate_iou: float = 0.9  # two phrases landing on the same box keep only the better one
    # --- detection ---
    detector_path: str | None = None  # local HF GroundingDINO folder
    box_threshold: float = 0.35  # minimum phrase score of a detected box (GroundingDINO demo value)
    batch_size: int = 8  # images per detector / depth forward pass
    max_phrases: int = 12  # phrases per caption sent to the detector (first ones in caption order)
    # --- head crops (person objects) ---
    head_detection: bool = True  # run the detector for "head" inside each person box
    head_prompt: tuple[str, ...] = ("head",)
    head_threshold: float = 0.25
    head_min_side: int = 16  # a head box smaller than this is not stored
    # --- control images ---
    controls: tuple[str, ...] = ("canny", "sketch")
    depth_path: str | None = None  # local HF depth-estimation folder (DPT / Depth Anything)
    canny_low: int = 100
    canny_high: int = 200
    sketch_sigma: float = 0.8  # XDoG base sigma at a 512 px short side (scaled with image size)
    # --- runtime ---
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    dtype: str = "float32"  # float32 | float16 | bfloat16 (models only; rules use float boxes)
    images_per_part: int = 1000  # folder / parquet-row / known-boxes sources: images per output shard
    jpeg_quality: int = 95
    extra: dict = field(default_factory=dict)  # free-form notes copied into the manifest

    def validate(self) -> BootstrapConfig:
        """Raise ValueError naming the bad field and what is allowed; return self for chaining."""
        if self.min_crop_side < 1:
            raise ValueError(f"min_crop_side must be >= 1 px, got {self.min_crop_side}")
        if not 0.0 < self.max_crop_area_frac <= 1.0:
            raise ValueError(f"max_crop_area_frac must be in (0, 1], got {self.max_crop_area_frac}")
        if self.max_crops < 0:
            raise ValueError(f"max_crops must be >= 0, got {self.max_crops}")
        if not 0.0 < self.duplicate_iou <= 1.0:
            raise ValueError(f"duplicate_iou must be in (0, 1], got {self.duplicate_iou}")
        for name in ("box_threshold", "head_threshold"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.batch_size < 1 or self.images_per_part < 1 or self.max_phrases < 1:
            raise ValueError("batch_size, images_per_part and max_phrases must be >= 1")
        self.controls = tuple(self.controls)
        self.head_prompt = tuple(self.head_prompt)
        bad = [c for c in self.controls if c not in KNOWN_CONTROLS]
        if bad:
            raise ValueError(f"unknown control(s) {bad}; choose from {list(KNOWN_CONTROLS)}")
        if "depth" in self.controls and not self.depth_path:
            raise ValueError(
                "control 'depth' needs a local depth model folder: pass depth_path / --depth-model "
                "(e.g. a Depth-Anything or DPT folder with config.json + model.safetensors + "
                "preprocessor_config.json), or drop 'depth' from controls"
            )
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["controls"] = list(self.controls)
        d["head_prompt"] = list(self.head_prompt)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BootstrapConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown BootstrapConfig field(s) {sorted(unknown)}")
        kw = dict(d)
        for k in ("controls", "head_prompt"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw).validate()

    def fingerprint(self) -> str:
        """Hash of the fields that change a shard's content.

        Runtime-only fields (device, batch size) are left out so a resumed run may use another
        machine; everything that changes records or files is in, so resuming into an output folder
        made with other rules is refused instead of mixing two datasets.
        """
        runtime = {"device", "batch_size", "extra"}
        d = {k: v for k, v in self.to_dict().items() if k not in runtime}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
