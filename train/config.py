"""The trainer's one typed configuration: nested dataclasses loaded from YAML or TOML, plus overrides.

Overrides use one mechanism, dotted keys validated against the dataclass types:
``--set optim.lr=1e-5 data.stage=2`` or the equivalent ``--optim.lr 1e-5``. Unknown keys and values of
the wrong type are errors that name the key and what it accepts, so a typo never silently trains
with a default.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PartMode = Literal["frozen", "lora", "full"]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


@dataclass
class ModelConfig:
    preset: str = "real"  # mumu_core.presets name: real | tiny | mini
    vlm: str = ""  # Hugging Face Idefics2 folder (idefics2-8b for the real preset)
    sdxl: str = ""  # SDXL single-file checkpoint or diffusers folder (unet/ vae/ scheduler/)
    init_bundle: str = ""  # start from a MUMU bundle (stage 2 starts from stage 1's output)
    # Mixed precision: parameters are stored in fp32 and cast to param_dtype for compute (FSDP2
    # MixedPrecisionPolicy); gradients are reduced in reduce_dtype. bf16 on GPU; fp32 for CPU tests.
    param_dtype: Literal["bf16", "fp32"] = "bf16"
    reduce_dtype: Literal["bf16", "fp32"] = "fp32"
    gradient_checkpointing: bool = True
    # VAE dtype for encoding targets; SDXL's VAE overflows in fp16, fp32 is the safe default.
    vae_dtype: Literal["bf16", "fp32"] = "fp32"
    # Storage dtype of the base weights that do not train (the ViT, and the LLM / UNet under LoRA).
    # bf16 halves host memory while loading (idefics2-8b + SDXL: ~38 -> ~19 GB per process) and the
    # frozen FSDP shards; trainable parameters (LoRAs, connector, full parts) are always fp32 masters.
    frozen_dtype: Literal["bf16", "fp32"] = "fp32"
    # Keep the VLM's perceiver resampler (each image = its n_latents tokens) instead of removing it:
    # Finding 1's ablation only; MUMU removes it. Recorded in the bundle (mumu.keep_perceiver).
    keep_perceiver: bool = False


@dataclass
class PartConfig:
    mode: PartMode = "frozen"
    lr: float = 0.0
    rank: int = 8  # LoRA rank (mode=lora only)
    alpha: float = 8.0  # LoRA alpha (mode=lora only)


@dataclass
class PartsConfig:
    """What trains (paper Table 1 defaults): ViT frozen, LLM + projector LoRA 8 @ 3e-6,
    connector full @ 1e-5, UNet LoRA 8 @ 5e-6."""

    vision: PartConfig = field(default_factory=lambda: PartConfig("frozen", 0.0))
    vlm: PartConfig = field(default_factory=lambda: PartConfig("lora", 3e-6))
    connector: PartConfig = field(default_factory=lambda: PartConfig("full", 1e-5))
    unet: PartConfig = field(default_factory=lambda: PartConfig("lora", 5e-6))


@dataclass
class OptimConfig:
    batch_size: int = 1  # per rank and micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = 0.0  # cosine/linear decay floor, as a fraction of each part's lr
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0


@dataclass
class DiffusionConfig:
    # "preset": take the prediction type from the preset's scheduler config (epsilon for SDXL,
    # v_prediction for mini); or force one.
    prediction_type: Literal["preset", "epsilon", "v_prediction"] = "preset"
    cond_dropout: float = 0.1  # fraction of samples trained with the negative conditioning (for CFG)
    ema: bool = False
    ema_decay: float = 0.999
    # Min-SNR-gamma loss weighting (Hang et al. 2023, as diffusers' training examples' --snr_gamma):
    # each sample's loss is weighted by min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), which
    # shifts the effort to the middle noise levels where layout and shape are decided. 0 = plain MSE.
    snr_gamma: float = 0.0
    # With v-prediction, min-SNR's weight SNR/(SNR+1) vanishes at high noise (exactly 0 at a zero-terminal-
    # SNR schedule's last step), where a sample's background and layout are decided. A floor f in [0, 1]
    # lifts it there: max(min-SNR, f * min(1, gamma/(SNR+1))), the low-noise cap unchanged; 1 gives every
    # step below SNR gamma-1 full weight. Epsilon's min-SNR weight is already 1 there: v-prediction only.
    snr_high_noise_floor: float = 0.0
    # "uniform": timesteps uniform, each sample's loss times its min-SNR weight. "weighted": timesteps
    # drawn in proportion to those weights (stratified over the batch) and every sample weighted
    # equally; the expected loss is the same, but no sample is spent on a step whose weight is near 0
    # (29% of the mini schedule's steps under min-SNR-5 with v-prediction), so the gradient is less noisy.
    timestep_sampling: Literal["uniform", "weighted"] = "uniform"


@dataclass
class DataConfig:
    shards: list[str] = field(default_factory=list)  # tar paths, globs or brace patterns {000..009}
    stage: Literal[1, 2] = 1
    # Tokens per reference image; 0 = the preset's tokens_per_image in stage 1 and 4x that in stage 2
    # (real: 324 and 1296, the paper's numbers).
    tokens_per_image: int = 0
    # When not empty, each reference image draws its tokens uniformly from this list instead (every
    # entry a square number), so one model serves several token budgets (Finding 1 at inference).
    # Single process only: under FSDP, images of different sides take different vision-tower calls.
    tokens_choices: list[int] = field(default_factory=list)
    # Stage 1: each chosen crop is left out (its words stay) with this probability, as when a detector
    # misses an object; a prompt can end up text-only, which keeps text-only prompts in distribution.
    image_drop_prob: float = 0.0
    max_crops: int = 3  # stage 1: up to this many object crops per prompt
    max_images: int = 4  # crops + control image
    control_prob: float = 0.3  # stage 1: an extra canny / depth / sketch image of the whole input
    head_prob: float = 0.7  # a person crop is replaced by its head crop
    augment_prob: float = 0.2  # a conditioning image is augmented
    target_crop: Literal["random", "center"] = "random"
    resolution: int = 0  # target side; 0 = the preset's resolution
    prefetch: int = 4  # examples decoded ahead in a background thread
    # Bad data (a corrupt image, a bad or missing json record, a truncated or garbage tar) is skipped,
    # logged with its shard and key and counted; the run stops with an error once BOTH limits are
    # exceeded over all processes: more than max_bad_samples bad items AND more than max_bad_fraction
    # of the items read (0 and 0.0: stop at the first bad item).
    max_bad_samples: int = 100
    max_bad_fraction: float = 0.01


@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between checkpoints (and exports)
    keep: int = 3  # checkpoints kept; older ones are deleted
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints


@dataclass
class LoggingConfig:
    every: int = 10  # steps between TensorBoard scalars
    sample_every: int = 0  # steps between sample grids (0: never)
    sample_count: int = 4  # fixed prompts in the grid (taken from the start of the data stream)
    sample_steps: int = 0  # denoising steps; 0 = the preset's num_inference_steps
    guidance_scale: float = 0.0  # 0 = the preset's guidance scale
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TrainConfig:
    out_dir: str = "runs/mumu"
    model: ModelConfig = field(default_factory=ModelConfig)
    parts: PartsConfig = field(default_factory=PartsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        problems = []
        if not self.model.vlm:
            problems.append("model.vlm is empty: set it to the Idefics2 folder")
        if not self.model.sdxl:
            problems.append("model.sdxl is empty: set it to the SDXL checkpoint or diffusers folder")
        if not self.data.shards:
            problems.append("data.shards is empty: list the bootstrapped webdataset tar files")
        if self.parts.vision.mode == "lora":
            problems.append("parts.vision.mode=lora is not supported: the vision tower is frozen or full")
        for name in ("vision", "vlm", "connector", "unet"):
            p = getattr(self.parts, name)
            if p.mode != "frozen" and p.lr <= 0:
                problems.append(f"parts.{name}.lr must be > 0 when mode={p.mode}")
            if p.mode == "lora" and p.rank < 1:
                problems.append(f"parts.{name}.rank must be >= 1 for LoRA")
        if all(getattr(self.parts, n).mode == "frozen" for n in ("vision", "vlm", "connector", "unet")):
            problems.append("every part is frozen: nothing would train")
        for key, v in (
            ("diffusion.cond_dropout", self.diffusion.cond_dropout),
            ("data.control_prob", self.data.control_prob),
            ("data.head_prob", self.data.head_prob),
            ("data.augment_prob", self.data.augment_prob),
        ):
            if not 0.0 <= v <= 1.0:
                problems.append(f"{key}={v} must be a probability in [0, 1]")
        if self.diffusion.snr_gamma < 0:
            problems.append(f"diffusion.snr_gamma={self.diffusion.snr_gamma} must be >= 0 (0 = plain MSE)")
        if not 0.0 <= self.diffusion.snr_high_noise_floor <= 1.0:
            problems.append(
                f"diffusion.snr_high_noise_floor={self.diffusion.snr_high_noise_floor} must be in [0, 1]"
            )
        for key, on in (
            ("diffusion.snr_high_noise_floor", self.diffusion.snr_high_noise_floor > 0),
            ("diffusion.timestep_sampling=weighted", self.diffusion.timestep_sampling == "weighted"),
        ):
            if on and not self.diffusion.snr_gamma:
                problems.append(f"{key} needs diffusion.snr_gamma > 0 (it works on the min-SNR weights)")
        if not 0.0 < self.diffusion.ema_decay < 1.0:
            problems.append("diffusion.ema_decay must be in (0, 1)")
        for key, v in (
            ("optim.batch_size", self.optim.batch_size),
            ("optim.grad_accum", self.optim.grad_accum),
            ("optim.max_steps", self.optim.max_steps),
            ("checkpoint.every", self.checkpoint.every),
            ("checkpoint.keep", self.checkpoint.keep),
            ("data.max_images", self.data.max_images),
        ):
            if v < 1:
                problems.append(f"{key}={v} must be >= 1")
        if self.data.max_bad_samples < 0 or not 0.0 <= self.data.max_bad_fraction <= 1.0:
            problems.append("data.max_bad_samples must be >= 0 and data.max_bad_fraction in [0, 1]")
        if self.data.max_crops < 1 or self.data.max_crops > self.data.max_images:
            problems.append("data.max_crops must be between 1 and data.max_images")
        if problems:
            raise ConfigError("invalid training config:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML/TOML file into :class:`TrainConfig`, then apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see train/configs/ for examples)")
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} cannot be read ({e})") from None
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                data = yaml.safe_load(text) or {}
            except yaml.YAMLError as e:
                raise ConfigError(
                    f"config file {path} is not valid YAML: {' '.join(str(e).split())}"
                ) from None
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    cfg = from_dict(TrainConfig, data, "")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"{prefix.rstrip('.') or 'the top level'} accepts {sorted(names)}"
        )
    obj = cls()
    for k, v in data.items():
        setattr(obj, k, coerce(hints[k], v, prefix + k))
    return obj


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting strings from the command line)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union types are not supported in the config")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be an integer")
        try:
            if isinstance(value, str):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, int):
                return value
        except ValueError:
            pass
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {tp}")


def apply_override(cfg: TrainConfig, item: str) -> None:
    """Apply one ``dotted.key=value`` override in place, validated against the field's type."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-5")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    obj: Any = cfg
    for i, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(obj) else []
            raise ConfigError(f"unknown config key {key!r}: {where} accepts {valid}")
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[name]
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section; override one of its keys, e.g. {key}.<name>=...")
            value: Any = raw
            if typing.get_origin(tp) is not list and tp is not str:
                # YAML scalars on the command line: 1e-5, true, 3 (strings stay strings).
                import yaml

                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    value = raw
                if isinstance(value, str) or value is None:
                    value = raw
            setattr(obj, name, coerce(tp, value, key))
        else:
            obj = getattr(obj, name)


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--config FILE``, ``--set k=v [k=v ...]`` and ``--section.key value`` -> (file, overrides)."""
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(HELP)
            raise SystemExit(0)
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file path")
            config = argv[i + 1]
            i += 2
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
            i += 1
        elif a == "--set":
            i += 1
            if i >= len(argv) or argv[i].startswith("--"):
                raise ConfigError("--set needs at least one key=value")
            while i < len(argv) and not argv[i].startswith("--"):
                overrides.append(argv[i])
                i += 1
        elif a.startswith("--") and "." in a:
            if "=" in a:
                overrides.append(a[2:])
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value")
                overrides.append(f"{a[2:]}={argv[i + 1]}")
                i += 2
        elif a.startswith("--") and a[2:] == "out_dir":
            if i + 1 >= len(argv):
                raise ConfigError("--out_dir needs a value")
            overrides.append(f"out_dir={argv[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"unexpected argument {a!r}.\n{HELP}")
    return config, overrides


HELP = """usage: python -m train --config FILE [--set key=value ...] [--section.key value ...]

Train MUMU. FILE is YAML or TOML (see train/configs/ and docs/TRAINING.md for every key).
Overrides are dotted keys validated against the config types, e.g.
  python -m train --config train/configs/stage1.yaml --set optim.max_steps=100 parts.unet.lr=1e-5
  python -m train --config train/configs/tiny.yaml --optim.batch_size 2 --out_dir /tmp/run
Launch with torchrun for several processes / GPUs / nodes (same flags).
Re-export a checkpoint: python -m train export RUN_DIR [--step N] [--dest DIR]"""
