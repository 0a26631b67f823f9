"""Synthetic text-image pairs: prompt table -> SDXL -> PickScore filter -> webdataset shards.

The paper's data is mostly this: ~3M SDXL images of "content, style" prompts kept at or above a minimum
PickScore. ``synth(table, out_dir, SynthConfig)``:

- The table (``prompts.py``) is cut into parts of ``prompts_per_shard`` rows; part ``i`` becomes
  ``shard-{i:06d}.tar`` + ``shard-{i:06d}.json`` (its statistics, written last: the done-marker), both
  atomic, through the bootstrap's ``ShardWriter`` / ``is_finished``. A killed run leaves only whole
  parts, and the next run redoes the unfinished ones from their first prompt: no duplicate, no loss.
- Each prompt id gets its own seed and SDXL aspect bucket (hashes of (seed, id)), so an image never
  depends on batching, worker or resume. A part is generated bucket by bucket in batches.
- Every image is checked (non-finite values -> ``nan``, near-black -> ``black``: dropped and counted),
  then scored with PickScore and kept when ``score >= min_pickscore``.
- ``executor="ray"`` runs the same ``synth_part`` in Ray Data actors (``ray_driver``).

Sample members: ``{id}.jpg`` and ``{id}.json`` with ``caption`` (what ``bootstrap --format wds``
reads), ``content``, ``style``, ``seed``, ``width``, ``height``, ``model``, ``steps``, ``guidance``,
``pickscore``. ``score_shards`` is the same PickScore pass over existing shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .pickscore import PickScorer, check_clip_folder, check_processor_folder, histogram_png, resolve_device
from .pipeline import finished_part_stats, is_finished, part_paths
from .prompts import read_table
from .shards import Sample, ShardWriter, ensure_writable_folder, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
HISTOGRAM = "pickscore_hist.png"
# SDXL's training buckets at 1024 px (width, height), the sizes SDXL base makes best.
SDXL_BUCKETS = (
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
)
SDXL_HELP = (
    "a diffusers StableDiffusionXLPipeline folder (model_index.json, unet/, vae/, text_encoder/, "
    "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), e.g. stabilityai/stable-diffusion-xl-base-1.0, "
    "or a single SDXL .safetensors checkpoint plus --text-encoders pointing at such a folder"
)


class SynthError(ValueError):
    """Bad input of ``synth`` / ``score``: the message says what to do."""


@dataclass
class SynthConfig:
    sdxl: str = ""  # diffusers SDXL folder or single .safetensors file
    text_encoders: str | None = None  # single file: folder with text_encoder(_2)/ tokenizer(_2)/
    preset: str = "real"  # single file: the UNet/VAE layout to convert to (mumu_core.presets)
    pickscore: str | None = None  # CLIPModel folder (PickScore_v1); None = no scoring, keep all
    pickscore_processor: str | None = None  # CLIPProcessor folder (default: the pickscore folder)
    min_pickscore: float = 20.0  # keep images scoring at least this (our default; see docs/DATA.md)
    steps: int = 30
    guidance: float = 7.0
    resolution: int | None = None  # base side; None = the UNet's sample_size x VAE scale (1024 for SDXL)
    aspect: str = "sdxl"  # "sdxl" = SDXL's buckets, "square" = resolution x resolution only
    batch_size: int = 4
    prompts_per_shard: int = 500
    seed: int = 0
    black_level: float = 0.02  # an image whose brightest value is below this (0..1) is "black"
    jpeg_quality: int = 95
    device: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    # Filled by ``synth`` (not by users): what makes the output, for the resume fingerprint.
    identity: dict = field(default_factory=dict)

    def validate(self) -> SynthConfig:
        if not self.sdxl:
            raise SynthError(f"no SDXL model: pass --sdxl, {SDXL_HELP}")
        if self.steps < 1 or self.batch_size < 1 or self.prompts_per_shard < 1:
            raise SynthError("steps, batch_size and prompts_per_shard must be >= 1")
        if self.aspect not in ("sdxl", "square"):
            raise SynthError(f"aspect must be 'sdxl' or 'square', got {self.aspect!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise SynthError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if not 0.0 <= self.black_level < 1.0:
            raise SynthError(f"black_level must be in [0, 1), got {self.black_level}")
        if not math.isfinite(self.min_pickscore) and self.min_pickscore != -math.inf:
            raise SynthError(f"min_pickscore must be a number, got {self.min_pickscore}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SynthConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def fingerprint(self) -> str:
        """Hash of everything that changes the output (not device, dtype or batch size)."""
        keep = {
            k: v
            for k, v in asdict(self).items()
            if k
            not in (
                "device",
                "dtype",
                "batch_size",
                "sdxl",
                "text_encoders",
                "pickscore",
                "pickscore_processor",
            )
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# -- identities, seeds, buckets ---------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(path: str | os.PathLike) -> str:
    """``name@hash`` of a model file or folder from its file names and sizes (cheap: no weights read)."""
    p = Path(path)
    files = (
        [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
    )
    h = hashlib.sha256()
    for q in files:
        h.update(f"{q.relative_to(p) if p.is_dir() else q.name}:{q.stat().st_size}\n".encode())
    return f"{p.stem if p.is_file() else p.name}@{h.hexdigest()[:12]}"


def _hash_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The noise seed of one prompt: a function of (run seed, prompt id) only."""
    return _hash_int(seed, "noise", prompt_id) & 0x7FFFFFFF


def buckets(resolution: int, aspect: str, multiple: int = 8) -> list[tuple[int, int]]:
    """SDXL's buckets scaled to ``resolution`` and rounded to ``multiple`` (diffusers needs 8)."""
    if aspect == "square":
        return [(resolution, resolution)]
    out: list[tuple[int, int]] = []
    for w, h in SDXL_BUCKETS:
        size = (
            max(multiple, round(w * resolution / 1024 / multiple) * multiple),
            max(multiple, round(h * resolution / 1024 / multiple) * multiple),
        )
        if size not in out:
            out.append(size)
    return out


def prompt_bucket(seed: int, prompt_id: str, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    return sizes[_hash_int(seed, "bucket", prompt_id) % len(sizes)]


# -- the image generator ----------------------------------------------------------------------------


def _torch_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def check_sdxl_path(path: str | os.PathLike, text_encoders: str | os.PathLike | None) -> None:
    """Cheap checks before any model loads: the path holds a text-to-image SDXL pipeline."""
    p = Path(path)
    if not p.exists():
        raise SynthError(f"SDXL path {p} does not exist: put {SDXL_HELP} there")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise SynthError(f"{p} is not a .safetensors file (pickled checkpoints are never loaded)")
        if text_encoders is None:
            raise SynthError(
                f"{p} is a single file: SDXL text-to-image also needs its two CLIP text encoders and "
                "tokenizers: pass --text-encoders with a diffusers SDXL folder (text_encoder/, text_encoder_2/, "
                "tokenizer/, tokenizer_2/), e.g. the one of stabilityai/stable-diffusion-xl-base-1.0"
            )
        _check_text_parts(Path(text_encoders))
        return
    index = p / "model_index.json"
    if not index.is_file():
        raise SynthError(f"{p} has no model_index.json, so it is no diffusers pipeline: give {SDXL_HELP}")
    cls = json.loads(index.read_text("utf-8")).get("_class_name")
    if cls != "StableDiffusionXLPipeline":
        raise SynthError(
            f"{p} holds a {cls!r}, not a StableDiffusionXLPipeline (SDXL base or fine-tune text-to-image): "
            f"give {SDXL_HELP}"
        )
    _check_text_parts(p)
    for sub in ("unet", "vae"):
        if not (p / sub / "config.json").is_file():
            raise SynthError(f"{p} lacks {sub}/config.json: give {SDXL_HELP}")


def _check_text_parts(folder: Path) -> None:
    for sub in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not (folder / sub).is_dir():
            raise SynthError(f"{folder} lacks {sub}/: SDXL's text side must be there ({SDXL_HELP})")


class SDXLGenerator:
    """diffusers' ``StableDiffusionXLPipeline``; ``generate`` returns float images in [0, 1] (NaN kept)."""

    def __init__(self, pipe, identity: str):
        self.pipe = pipe
        self.identity = identity
        self.pipe.set_progress_bar_config(disable=True)

    @property
    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @classmethod
    def from_path(
        cls,
        path: str | os.PathLike,
        text_encoders: str | os.PathLike | None = None,
        preset: str = "real",
        device: str = "auto",
        dtype: str = "auto",
    ) -> SDXLGenerator:
        from ..sdxl import sdxl_pipeline_class

        StableDiffusionXLPipeline = sdxl_pipeline_class()
        check_sdxl_path(path, text_encoders)
        p = Path(path)
        device = resolve_device(device)
        tdtype = _torch_dtype(dtype, device)
        try:
            if p.is_dir():
                from ..sdxl import _variant

                pipe = StableDiffusionXLPipeline.from_pretrained(
                    p,
                    dtype=tdtype,
                    use_safetensors=True,
                    local_files_only=True,
                    variant=_variant(p / "unet"),
                )
            else:
                pipe = _single_file_pipeline(p, Path(text_encoders), preset, tdtype)
        except SynthError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise SynthError(f"cannot load SDXL from {p}: {e}. It must be {SDXL_HELP}.") from e
        return cls(pipe.to(device), model_identity(p))

    @torch.inference_mode()
    def generate(
        self,
        captions: Sequence[str],
        seeds: Sequence[int],
        width: int,
        height: int,
        steps: int,
        guidance: float,
    ) -> np.ndarray:
        # CPU generators: the same seed gives the same noise on every device.
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        out = self.pipe(
            prompt=list(captions),
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="np",
        )
        return np.asarray(out.images, dtype=np.float32)


def _single_file_pipeline(path: Path, text_dir: Path, preset: str, dtype: torch.dtype):
    """UNet + VAE from the checkpoint (MUMU's offline converter), the text side from ``text_dir``."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ..presets import get_preset
    from ..sdxl import load_sdxl, sdxl_pipeline_class

    StableDiffusionXLPipeline = sdxl_pipeline_class()

    comps = load_sdxl(path, get_preset(preset), dtype)
    kw = {"dtype": dtype, "use_safetensors": True, "local_files_only": True}
    return StableDiffusionXLPipeline(
        vae=comps.vae,
        unet=comps.unet,
        scheduler=comps.scheduler,
        text_encoder=CLIPTextModel.from_pretrained(text_dir / "text_encoder", **kw),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(text_dir / "text_encoder_2", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(text_dir / "tokenizer", local_files_only=True),
        tokenizer_2=CLIPTokenizer.from_pretrained(text_dir / "tokenizer_2", local_files_only=True),
    )


@dataclass
class SynthModels:
    """What one worker holds (built once per process / Ray actor); tests may pass their own."""

    generator: SDXLGenerator | None = None
    scorer: PickScorer | None = None

    @classmethod
    def load(cls, cfg: SynthConfig, need_generator: bool = True) -> SynthModels:
        gen = (
            SDXLGenerator.from_path(cfg.sdxl, cfg.text_encoders, cfg.preset, cfg.device, cfg.dtype)
            if need_generator
            else None
        )
        scorer = None
        if cfg.pickscore:
            scorer = PickScorer.from_pretrained(
                cfg.pickscore,
                cfg.pickscore_processor,
                cfg.device,
                cfg.dtype,
                batch_size=max(cfg.batch_size, 8),
            )
        return cls(gen, scorer)


# -- one part ---------------------------------------------------------------------------------------


def image_problem(img: np.ndarray, black_level: float) -> str | None:
    """``"nan"`` for non-finite values, ``"black"`` when nothing is brighter than ``black_level``."""
    if not np.isfinite(img).all():
        return "nan"
    if float(img.max()) < black_level:
        return "black"
    return None


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4 as bootstrap's re-encodes
    return buf.getvalue()


def _empty_stats() -> dict:
    return {
        "prompts": 0,
        "generated": 0,
        "kept": 0,
        "dropped": {"nan": 0, "black": 0, "pickscore": 0},
        "scores": [],
    }


def _merge(a: dict, b: dict) -> dict:
    for k in ("prompts", "generated", "kept"):
        a[k] += b.get(k, 0)
    for k, v in b.get("dropped", {}).items():
        a["dropped"][k] = a["dropped"].get(k, 0) + v
    a["scores"].extend(b.get("scores", []))
    return a


def part_rows(rows: Sequence[dict], index: int, per_part: int) -> Sequence[dict]:
    return rows[index * per_part : (index + 1) * per_part]


def synth_part(
    rows: Sequence[dict],
    index: int,
    out_dir: str | os.PathLike,
    cfg: SynthConfig,
    models: SynthModels,
    on_images: Callable[[int], None] | None = None,
) -> dict:
    """Generate, check, score and write part ``index`` (its rows of the table); return its statistics."""
    t0 = time.perf_counter()
    gen = models.generator
    if gen is None:
        raise SynthError("synth_part needs a generator (SynthModels.generator is None)")
    mine = part_rows(rows, index, cfg.prompts_per_shard)
    res = cfg.resolution or gen.native_resolution
    sizes = buckets(res, cfg.aspect)
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in mine:
        by_bucket.setdefault(prompt_bucket(cfg.seed, r["id"], sizes), []).append(r)
    stats = _empty_stats()
    stats["prompts"] = len(mine)
    tar, st = part_paths(out_dir, index)
    with ShardWriter(tar) as writer:
        for (w, h), group in sorted(by_bucket.items()):
            for s in range(0, len(group), cfg.batch_size):
                batch = group[s : s + cfg.batch_size]
                seeds = [prompt_seed(cfg.seed, r["id"]) for r in batch]
                arrays = gen.generate([r["caption"] for r in batch], seeds, w, h, cfg.steps, cfg.guidance)
                stats["generated"] += len(batch)
                ok: list[tuple[dict, int, Image.Image]] = []
                for r, seed, arr in zip(batch, seeds, arrays):
                    problem = image_problem(arr, cfg.black_level)
                    if problem:
                        log.warning("dropping %s (seed %d): %s image", r["id"], seed, problem)
                        stats["dropped"][problem] += 1
                        continue
                    ok.append((r, seed, Image.fromarray((arr * 255).round().clip(0, 255).astype(np.uint8))))
                scores: list[float | None] = [None] * len(ok)
                if models.scorer is not None and ok:
                    scores = models.scorer.score([im for _, _, im in ok], [r["caption"] for r, _, _ in ok])
                for (r, seed, im), score in zip(ok, scores):
                    if score is not None:
                        stats["scores"].append(round(float(score), 4))
                        if score < cfg.min_pickscore:
                            stats["dropped"]["pickscore"] += 1
                            continue
                    writer.add(
                        Sample(
                            r["id"],
                            _record(r, seed, im, score, gen.identity, cfg, models),
                            {"jpg": _jpeg(im, cfg.jpeg_quality)},
                        )
                    )
                    stats["kept"] += 1
                if on_images:
                    on_images(len(batch))
        size = writer.commit()
    stats.update(
        part=index,
        shard=tar.name,
        shard_bytes=size,
        seconds=round(time.perf_counter() - t0, 3),
        fingerprint=cfg.fingerprint(),
    )
    write_json_atomic(st, stats)  # last: the done-marker
    return stats


def _record(
    row: dict, seed: int, im: Image.Image, score, model: str, cfg: SynthConfig, models: SynthModels
) -> dict:
    return {
        "key": row["id"],
        "caption": row["caption"],
        "content": row.get("content"),
        "style": row.get("style"),
        "content_id": row.get("content_id"),
        "style_id": row.get("style_id"),
        "seed": seed,
        "width": im.width,
        "height": im.height,
        "model": model,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "pickscore": None if score is None else round(float(score), 4),
        "pickscore_model": models.scorer.identity if models.scorer is not None else None,
    }


def _safe(fn, index: int, *args) -> dict:
    """Run one part; a failure is reported (and the part redone by the next run), never fatal to the job."""
    try:
        return fn(*args)
    except Exception as e:
        log.exception("part %d failed; it has no output and will be retried by the next run", index)
        return {"part": index, "failed": f"{type(e).__name__}: {e}"}


class _RaySynthWorker:
    """Ray Data actor: loads SDXL + PickScore once, then turns part indexes into shards (``synth_part``)."""

    def __init__(self, table: str, out_dir: str, cfg: dict, torch_threads: int):
        logging.basicConfig(level=logging.INFO)
        torch.set_num_threads(max(1, torch_threads))
        self.rows, self.out_dir = read_table(table), out_dir
        self.cfg = SynthConfig.from_dict(cfg)
        self.models = SynthModels.load(self.cfg)

    def __call__(self, batch: dict) -> dict:
        out = []
        for idx in batch["part"]:
            i = int(idx)
            out.append(json.dumps(_safe(synth_part, i, self.rows, i, self.out_dir, self.cfg, self.models)))
        return {"stats": out}


def check_output_folder(out: str | os.PathLike) -> Path:
    try:
        return ensure_writable_folder(out)
    except PermissionError as e:
        raise SynthError(f"{e}: choose another --out or fix its permissions") from e


def synth(
    table: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: SynthConfig,
    executor: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    models: SynthModels | None = None,
) -> dict:
    """Generate the table's images into ``out_dir``; skip finished parts; return the manifest."""
    cfg.validate()
    if executor not in ("local", "ray"):
        raise SynthError(f"executor must be 'local' or 'ray', got {executor!r}")
    # Everything cheap first: the table, the model folders, the output folder.
    rows = read_table(table)
    if models is None:
        check_sdxl_path(cfg.sdxl, cfg.text_encoders)
        if cfg.pickscore:
            check_clip_folder(cfg.pickscore)
            check_processor_folder(cfg.pickscore_processor or cfg.pickscore)
    out = check_output_folder(out_dir)
    cfg.identity = {
        "table_sha256": file_sha256(table),
        "sdxl": model_identity(cfg.sdxl) if models is None else models.generator.identity,
        "pickscore": (model_identity(cfg.pickscore) if cfg.pickscore else None)
        if models is None
        else (models.scorer.identity if models.scorer else None),
    }
    n_parts = (len(rows) + cfg.prompts_per_shard - 1) // cfg.prompts_per_shard
    todo = [i for i in range(n_parts) if not is_finished(out, i, cfg)]
    if n_parts - len(todo):
        log.info("resuming: %d of %d parts already finished", n_parts - len(todo), n_parts)
    if todo and executor == "local":
        models = models or SynthModels.load(cfg)  # before the clock: images/s counts generation only
    t0 = time.perf_counter()
    results: list[dict] = []
    if todo and executor == "local":
        from tqdm.auto import tqdm

        with tqdm(
            total=sum(len(part_rows(rows, i, cfg.prompts_per_shard)) for i in todo),
            unit="img",
            desc="synth",
            disable=not progress,
        ) as bar:
            for n, i in enumerate(todo):
                results.append(_safe(synth_part, i, rows, i, out, cfg, models, bar.update))
                bar.set_postfix(parts=f"{n + 1}/{len(todo)}")
    elif todo:
        from .ray_driver import run_parts_on_ray

        kwargs = {"table": str(Path(table).absolute()), "out_dir": str(out.absolute()), "cfg": cfg.to_dict()}
        results = run_parts_on_ray(
            _RaySynthWorker, kwargs, todo, "synth", progress, ray_address, num_workers, "generated"
        )
    threshold = cfg.min_pickscore if (models.scorer if models else cfg.pickscore) else None
    return write_run_manifest(
        out, n_parts, results, time.perf_counter() - t0, executor, cfg, "mumu-synth/1", threshold
    )


def write_run_manifest(
    out: Path,
    n_parts: int,
    results: Sequence[dict],
    elapsed: float,
    executor: str,
    cfg,
    fmt: str,
    threshold: float | None,
) -> dict:
    """Totals over every finished part, this run's line appended to ``runs``, and the histogram PNG."""
    total = _empty_stats()
    shards = []
    for _, s in finished_part_stats(out, n_parts):
        if s is not None:
            _merge(total, s)
            shards.append({"shard": s["shard"], "images": s["kept"], "bytes": s["shard_bytes"]})
    this = _empty_stats()
    for r in results:
        if "failed" not in r:
            _merge(this, r)
    old = json.loads((out / MANIFEST).read_text("utf-8")) if (out / MANIFEST).is_file() else {}
    scored = len(this["scores"])
    run = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "executor": executor,
        "parts_done": sum(1 for r in results if "failed" not in r),
        "generated": this["generated"],
        "kept": this["kept"],
        "dropped": this["dropped"],
        "kept_fraction": round(this["kept"] / this["generated"], 4) if this["generated"] else None,
        "kept_fraction_of_scored": round(sum(s >= threshold for s in this["scores"]) / scored, 4)
        if scored and threshold is not None
        else None,
        "seconds": round(elapsed, 3),
        "images_per_second": round(this["generated"] / elapsed, 3)
        if elapsed > 0 and this["generated"]
        else None,
    }
    hist = None
    if total["scores"]:
        hist = histogram_png(
            total["scores"], threshold, out / HISTOGRAM, title=f"PickScore of {out.name}"
        ).name
    manifest = {
        "format": fmt,
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "parts": {
            "total": n_parts,
            "finished": len(shards),
            "failed": [{"part": r["part"], "error": r["failed"]} for r in results if "failed" in r],
        },
        "counts": {
            "prompts": total["prompts"],
            "generated": total["generated"],
            "kept": total["kept"],
            "dropped": total["dropped"],
            "kept_fraction": round(total["kept"] / total["generated"], 4) if total["generated"] else None,
        },
        "pickscore": {
            "min": threshold,
            "scored": len(total["scores"]),
            "mean": round(float(np.mean(total["scores"])), 4) if total["scores"] else None,
            "quantiles": {
                q: round(float(np.quantile(total["scores"], float(q))), 4) for q in ("0.1", "0.5", "0.9")
            }
            if total["scores"]
            else None,
            "histogram": hist,
        },
        "shards": shards,
        "runs": old.get("runs", []) + [run],
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


# -- score: the same PickScore pass over existing shards -------------------------------------------


@dataclass
class ScoreConfig:
    pickscore: str = ""
    pickscore_processor: str | None = None
    min_pickscore: float = 20.0
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    inputs: list[str] = field(default_factory=list)  # the input tars, in part order
    identity: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScoreConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def fingerprint(self) -> str:
        keep = {"min": self.min_pickscore, "inputs": self.inputs, "identity": self.identity}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _read_tar_samples(path: str) -> tuple[list[dict[str, bytes]], str | None]:
    """Samples of a tar (members grouped by key) and the error that stopped reading, if any."""
    samples: list[dict[str, bytes]] = []
    cur: dict | None = None
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                d, base = os.path.split(m.name)
                if not m.isfile() or "." not in base:
                    continue
                stem, suffix = base.split(".", 1)
                key = f"{d.replace('/', '_')}_{stem}" if d else stem  # output keys have no '/'
                if cur is None or cur["__key__"] != key:
                    if cur is not None:
                        samples.append(cur)
                    cur = {"__key__": key}
                f = tf.extractfile(m)
                cur[suffix.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        # The sample being read may be incomplete, so it is not kept; the ones before it are.
        return samples, f"corrupt tar {path}: {e}"
    if cur is not None:
        samples.append(cur)
    return samples, None


def _caption_of(members: dict) -> tuple[str | None, dict | None]:
    record = None
    if "json" in members:
        try:
            record = json.loads(members["json"])
        except ValueError:
            record = None
    if isinstance(record, dict):
        for k in ("caption", "text", "TEXT", "prompt"):
            if isinstance(record.get(k), str):
                return record[k], record
    if "txt" in members:
        return members["txt"].decode("utf-8", "replace").strip(), record if isinstance(record, dict) else None
    return None, None


def score_part(
    index: int, out_dir: str | os.PathLike, cfg: ScoreConfig, scorer: PickScorer, on_images=None
) -> dict:
    """Score every sample of input tar ``index``; write the kept ones (pickscore in their json)."""
    t0 = time.perf_counter()
    path = cfg.inputs[index]
    samples, error = _read_tar_samples(path)
    stats = _empty_stats()
    stats.update(errors=[error] if error else [], unreadable=0)
    stats["prompts"] = len(samples)
    tar, st = part_paths(out_dir, index)
    with ShardWriter(tar) as writer:
        for s in range(0, len(samples), cfg.batch_size):
            batch = samples[s : s + cfg.batch_size]
            items = []
            for m in batch:
                img_key = next((e for e in ("jpg", "jpeg", "png", "webp") if e in m), None)
                caption, record = _caption_of(m)
                try:
                    if img_key is None or caption is None:
                        raise ValueError("no image member or no caption")
                    im = Image.open(io.BytesIO(m[img_key]))
                    im.load()
                except Exception as e:  # PIL raises many types
                    stats["unreadable"] += 1
                    stats["errors"].append(f"{m['__key__']}: {e}")
                    continue
                items.append((m, im.convert("RGB"), caption, record))
            stats["generated"] += len(items)
            scores = scorer.score([im for _, im, _, _ in items], [c for _, _, c, _ in items]) if items else []
            for (m, _im, caption, record), score in zip(items, scores):
                stats["scores"].append(round(float(score), 4))
                if score < cfg.min_pickscore:
                    stats["dropped"]["pickscore"] += 1
                    continue
                rec = dict(record) if record is not None else {"caption": caption}
                rec.update(pickscore=round(float(score), 4), pickscore_model=scorer.identity)
                files = {k: v for k, v in m.items() if k not in ("__key__", "json")}
                writer.add(Sample(m["__key__"], rec, files))
                stats["kept"] += 1
            if on_images:
                on_images(len(batch))
        size = writer.commit()
    stats.update(part=index, input=path, shard=tar.name, shard_bytes=size,
                 seconds=round(time.perf_counter() - t0, 3), fingerprint=cfg.fingerprint())  # fmt: skip
    write_json_atomic(st, stats)
    return stats


class _RayScoreWorker:
    def __init__(self, out_dir: str, cfg: dict, torch_threads: int):
        torch.set_num_threads(max(1, torch_threads))
        self.out_dir, self.cfg = out_dir, ScoreConfig.from_dict(cfg)
        c = self.cfg
        self.scorer = PickScorer.from_pretrained(
            c.pickscore, c.pickscore_processor, c.device, c.dtype, c.batch_size
        )

    def __call__(self, batch: dict) -> dict:
        out = []
        for idx in batch["part"]:
            i = int(idx)
            out.append(json.dumps(_safe(score_part, i, i, self.out_dir, self.cfg, self.scorer)))
        return {"stats": out}


def score_shards(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: ScoreConfig,
    executor: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    scorer: PickScorer | None = None,
) -> dict:
    """PickScore every sample of ``inputs`` (tars or folders of tars); keep ``>= min_pickscore``."""
    from .sources import _expand

    try:
        cfg.inputs = [str(Path(p).absolute()) for p in _expand(inputs, (".tar",))]
    except FileNotFoundError as e:
        raise SynthError(str(e)) from e
    out = check_output_folder(out_dir)
    if any(Path(p).parent == out.absolute() for p in cfg.inputs):
        raise SynthError(
            f"--out {out} holds the input shards: give another folder (inputs are never overwritten)"
        )
    if scorer is None:
        check_clip_folder(cfg.pickscore)
        check_processor_folder(cfg.pickscore_processor or cfg.pickscore)
    cfg.identity = {"pickscore": scorer.identity if scorer is not None else model_identity(cfg.pickscore)}
    n_parts = len(cfg.inputs)
    todo = [i for i in range(n_parts) if not is_finished(out, i, cfg)]
    t0 = time.perf_counter()
    results: list[dict] = []
    if todo and executor == "local":
        from tqdm.auto import tqdm

        scorer = scorer or PickScorer.from_pretrained(
            cfg.pickscore, cfg.pickscore_processor, cfg.device, cfg.dtype, cfg.batch_size
        )
        with tqdm(unit="img", desc="score", disable=not progress) as bar:
            for n, i in enumerate(todo):
                results.append(_safe(score_part, i, i, out, cfg, scorer, bar.update))
                bar.set_postfix(parts=f"{n + 1}/{len(todo)}")
    elif todo:
        from .ray_driver import run_parts_on_ray

        kwargs = {"out_dir": str(out.absolute()), "cfg": cfg.to_dict()}
        results = run_parts_on_ray(
            _RayScoreWorker, kwargs, todo, "score", progress, ray_address, num_workers, "prompts"
        )
    elapsed = time.perf_counter() - t0
    manifest = write_run_manifest(
        out, n_parts, results, elapsed, executor, cfg, "mumu-score/1", cfg.min_pickscore
    )
    errors = []
    for i in range(n_parts):
        st = part_paths(out, i)[1]
        if st.is_file():
            errors += json.loads(st.read_text("utf-8")).get("errors", [])
    manifest["errors"] = errors[:1000]
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
