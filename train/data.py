"""Train-time data: the paper's rules over a shard record, and deterministic webdataset streaming.

The rules are pure functions of (record, member images, rules, rng), so their proportions can be
tested exactly on a seeded sample. Each sample's rng is seeded from (seed, epoch, sample key), so an
example does not depend on which process reads it, on prefetching, or on a resume.

Documented choices (docs/TRAINING.md, "Data rules"):
- Stage 1: the kept objects that have a crop; if more than ``max_crops``, a random subset of that
  size. Each crop goes right before its words (as the bootstrapper's ``prompt``). With probability
  ``control_prob`` (when the record has control images and there is room under ``max_images``) one
  control image of the whole input (canny, depth or sketch, uniformly among those present) is
  appended at the END of the prompt with a short phrase, e.g. "a man and his dog, with the edges of
  <image>": appending keeps the caption's own interleaving intact and gives the control one fixed,
  learnable position.
- Stage 2: one person object (kept, with a crop), chosen uniformly; records without one are skipped.
- Person crops with a head crop are replaced by the head crop with probability ``head_prob``.
- Each conditioning image (crops and controls) is augmented with probability ``augment_prob`` by ONE
  operation chosen uniformly: random crop (80-100% of each side), horizontal flip, Gaussian noise
  (sigma 0.05) or grayscale.
- Every image is then prepared by ``prompt.prepare_image`` at encode time: black square pad, resize to
  exactly the token target (small crops are upsampled, never given fewer tokens).
- Targets are cropped, not bucketed: the shorter side is resized to the resolution, then a random (or
  centre) square crop; SDXL's micro-conditioning gets the source size, the crop's top-left in the
  resized image and the target size, as SDXL was trained.
- A sample without any usable image is skipped. With ``image_drop_prob`` (default 0) each chosen crop
  is left out while its words stay, as when a detector misses an object, so some prompts are
  text-only: the text-only baseline of an evaluation is then in distribution. Under FSDP every
  process's batch must still hold an image (the loop checks it).
- ``tokens_choices`` (default empty): each image draws its token count from the list (single process).
"""

from __future__ import annotations

import glob
import io
import json
import queue
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from mumu_core.prompt import ImageRef, InterleavedPrompt, check_tokens

from .config import DataConfig

CONTROL_KINDS = ("canny", "depth", "sketch")
# The words that introduce an appended control image (stage 1).
CONTROL_PHRASES = {
    "canny": ", with the edges of ",
    "depth": ", with the depth of ",
    "sketch": ", following the sketch ",
}
AUGMENTATIONS = ("crop", "flip", "noise", "grayscale")
NOISE_SIGMA = 0.05  # in [0, 1] pixel units
MIN_CROP_FRACTION = 0.8


class DataError(ValueError):
    """The shards or a record do not follow docs/ARCHITECTURE.md "Shard record"."""


@dataclass(frozen=True)
class Rules:
    stage: int
    tokens: int
    resolution: int
    max_crops: int = 3
    max_images: int = 4
    control_prob: float = 0.3
    head_prob: float = 0.7
    augment_prob: float = 0.2
    target_crop: str = "random"
    tokens_choices: tuple[int, ...] = ()
    image_drop_prob: float = 0.0

    @classmethod
    def from_config(cls, cfg: DataConfig, preset_tokens: int, preset_resolution: int) -> Rules:
        tokens = cfg.tokens_per_image or preset_tokens * (4 if cfg.stage == 2 else 1)
        try:
            check_tokens(tokens)
            for t in cfg.tokens_choices:
                check_tokens(t)
        except ValueError as e:
            raise DataError(f"data.tokens_per_image / data.tokens_choices: {e}") from None
        if not 0.0 <= cfg.image_drop_prob < 1.0:
            raise DataError(f"data.image_drop_prob must be in [0, 1), got {cfg.image_drop_prob}")
        return cls(
            stage=cfg.stage,
            tokens=tokens,
            resolution=cfg.resolution or preset_resolution,
            max_crops=cfg.max_crops,
            max_images=cfg.max_images,
            control_prob=cfg.control_prob,
            head_prob=cfg.head_prob,
            augment_prob=cfg.augment_prob,
            target_crop=cfg.target_crop,
            tokens_choices=tuple(cfg.tokens_choices),
            image_drop_prob=cfg.image_drop_prob,
        )

    def deterministic(self) -> Rules:
        """The same rules without randomness in the conditioning (for the fixed sample prompts)."""
        return replace(
            self,
            control_prob=0.0,
            head_prob=0.0,
            augment_prob=0.0,
            target_crop="center",
            tokens_choices=(),
            image_drop_prob=0.0,
        )

    def image_tokens(self, rng: random.Random) -> int:
        return rng.choice(self.tokens_choices) if self.tokens_choices else self.tokens


@dataclass
class Sample:
    """One decoded shard sample: the record, the source image and the member images by key."""

    key: str
    record: dict[str, Any]
    image: Image.Image
    members: dict[str, Image.Image] = field(default_factory=dict)


@dataclass
class Example:
    key: str
    prompt: InterleavedPrompt
    target: torch.Tensor  # (3, R, R) in [-1, 1]
    time_ids: tuple[int, int, int, int, int, int]  # orig h, w, crop top, left, target h, w
    position: tuple[int, int] = (0, 0)  # (epoch, samples of this rank's stream read so far)
    counts: tuple[int, int] = (0, 0)  # this rank's DataCounts (read, bad) when it was produced


# ---------------------------------------------------------------------------------------------------
# Pure rules


def usable_objects(record: dict[str, Any], members: dict[str, Any]) -> list[int]:
    """Indices of kept objects whose crop is present, in caption order."""
    objs = record.get("objects", [])
    idx = [i for i, o in enumerate(objs) if o.get("kept") and o.get("crop") and o["crop"] in members]
    return sorted(idx, key=lambda i: (objs[i]["span"][0], i))


def choose_objects(
    record: dict[str, Any], members: dict[str, Any], rules: Rules, rng: random.Random
) -> list[int]:
    """Stage 1: up to ``max_crops`` usable objects; stage 2: one person object (or none)."""
    usable = usable_objects(record, members)
    objs = record.get("objects", [])
    if rules.stage == 2:
        persons = [i for i in usable if objs[i].get("is_person")]
        return [rng.choice(persons)] if persons else []
    if len(usable) > rules.max_crops:
        chosen = set(rng.sample(usable, rules.max_crops))
        usable = [i for i in usable if i in chosen]
    return usable


def crop_member(obj: dict[str, Any], members: dict[str, Any], rules: Rules, rng: random.Random) -> str:
    """The member key of an object's conditioning image: its head crop with ``head_prob`` for persons."""
    head = obj.get("head_crop")
    if obj.get("is_person") and head and head in members and rng.random() < rules.head_prob:
        return head
    return obj["crop"]


def choose_control(
    record: dict[str, Any], members: dict[str, Any], n_images: int, rules: Rules, rng: random.Random
) -> str | None:
    """Stage 1: a control kind (canny/depth/sketch present in the record) with ``control_prob``."""
    if rules.stage != 1 or n_images >= rules.max_images:
        return None
    controls = record.get("controls") or {}
    kinds = [k for k in CONTROL_KINDS if controls.get(k) and controls[k] in members]
    if not kinds or rng.random() >= rules.control_prob:
        return None
    return rng.choice(kinds)


def augment(image: Image.Image, rng: random.Random, op: str | None = None) -> Image.Image:
    """One augmentation (uniform among AUGMENTATIONS unless ``op`` is given)."""
    op = op or rng.choice(AUGMENTATIONS)
    image = image.convert("RGB")
    if op == "crop":
        w, h = image.size
        cw = max(1, round(w * rng.uniform(MIN_CROP_FRACTION, 1.0)))
        ch = max(1, round(h * rng.uniform(MIN_CROP_FRACTION, 1.0)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        return image.crop((x, y, x + cw, y + ch))
    if op == "flip":
        return ImageOps.mirror(image)
    if op == "noise":
        arr = np.asarray(image, dtype=np.float32) / 255.0
        noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, NOISE_SIGMA, arr.shape)
        return Image.fromarray((np.clip(arr + noise, 0, 1) * 255).round().astype(np.uint8))
    if op == "grayscale":
        return ImageOps.grayscale(image).convert("RGB")
    raise ValueError(f"unknown augmentation {op!r}; choose from {AUGMENTATIONS}")


def maybe_augment(image: Image.Image, rules: Rules, rng: random.Random) -> Image.Image:
    return augment(image, rng) if rng.random() < rules.augment_prob else image


def build_prompt(
    caption: str,
    placed: Sequence[tuple[int, Image.Image, int]],
    control: tuple[str, Image.Image, int] | None,
) -> InterleavedPrompt:
    """Insert each (position, image, tokens) right before its caption position; append the control."""
    segs: list[str | ImageRef] = []
    pos = 0
    for start, img, tokens in sorted(placed, key=lambda p: p[0]):
        start = min(max(start, 0), len(caption))
        if start > pos:
            segs.append(caption[pos:start])
            pos = start
        segs.append(ImageRef(img, tokens))
    if pos < len(caption):
        segs.append(caption[pos:])
    if control is not None:
        kind, img, tokens = control
        segs.append(CONTROL_PHRASES[kind])
        segs.append(ImageRef(img, tokens))
    return InterleavedPrompt(tuple(s for s in segs if not isinstance(s, str) or s))


def target_crop(
    image: Image.Image, resolution: int, mode: str, rng: random.Random
) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize the shorter side to ``resolution``, crop a square; return pixels and SDXL time ids."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC) if (nw, nh) != (w, h) else image
    if mode == "random":
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    else:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    crop = resized.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    return x, (h, w, top, left, resolution, resolution)


def make_example(sample: Sample, rules: Rules, rng: random.Random) -> Example | None:
    """Apply the stage's rules to one sample; None when the sample has no usable image."""
    rec = sample.record
    caption = rec.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"sample {sample.key}: record has no caption")
    objs = rec.get("objects", [])
    chosen = choose_objects(rec, sample.members, rules, rng)
    placed = []
    for i in chosen:
        if rules.image_drop_prob and rng.random() < rules.image_drop_prob:
            continue  # the words stay, the image goes
        member = crop_member(objs[i], sample.members, rules, rng)
        img = maybe_augment(sample.members[member], rules, rng)
        placed.append((objs[i]["span"][0], img, rules.image_tokens(rng)))
    control = None
    kind = choose_control(rec, sample.members, len(placed), rules, rng)
    if kind is not None:
        img = maybe_augment(sample.members[rec["controls"][kind]], rules, rng)
        control = (kind, img, rules.image_tokens(rng))
    if not chosen and control is None:
        return None  # nothing this sample could condition on
    target, time_ids = target_crop(sample.image, rules.resolution, rules.target_crop, rng)
    return Example(sample.key, build_prompt(caption, placed, control), target, time_ids)


def sample_rng(seed: int, epoch: int, key: str) -> random.Random:
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and Python runs.
    return random.Random(f"{seed}/{epoch}/{key}")


# ---------------------------------------------------------------------------------------------------
# Reading shards


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Expand brace patterns and local globs; URLs and pipes pass through unchanged."""
    import braceexpand

    out: list[str] = []
    for pat in patterns:
        for p in braceexpand.braceexpand(pat):
            if "://" in p or p.startswith("pipe:"):
                out.append(p)
                continue
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"shard pattern {p!r} matches no file: check data.shards")
            out.extend(hits)
    if not out:
        raise DataError("data.shards lists no shard: give webdataset .tar files from the bootstrapper")
    return out


def iter_raw(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples (bytes per member) from ``urls`` in order; a broken shard raises."""
    import webdataset as wds

    yield from wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples())


@dataclass(frozen=True)
class BadItem:
    """A shard or sample the stream skipped: where, and why."""

    shard: str
    key: str | None  # None: the shard itself is unreadable (garbage, truncated, missing)
    reason: str

    def describe(self) -> str:
        where = f"sample {self.key} of {self.shard}" if self.key else f"shard {self.shard}"
        return f"skipped {where}: {self.reason}"


def iter_shard_events(url: str) -> Iterator[dict[str, Any] | BadItem]:
    """The raw samples of one shard, and a :class:`BadItem` where the shard breaks.

    A truncated tar gives its samples up to the break, then one BadItem; a file that is no tar at all
    gives just the BadItem. The order only depends on the file's bytes, so a resume that skips a
    number of these events lands exactly where the run was.
    """
    import webdataset as wds

    errors: list[BaseException] = []

    def keep_going(exn: BaseException) -> bool:
        errors.append(exn)
        return True

    def flush() -> Iterator[BadItem]:
        while errors:
            e = errors.pop(0)
            msg = str(e.args[0]) if e.args else type(e).__name__
            yield BadItem(url, None, f"unreadable tar ({type(e).__name__}: {msg.split(' @ ')[0]})")

    pipe = wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples(handler=keep_going))
    for raw in pipe:
        yield from flush()
        yield raw
    yield from flush()


def decode_sample(raw: dict[str, Any]) -> Sample:
    key = raw.get("__key__", "?")
    if "json" not in raw:
        raise DataError(f"sample {key} in {raw.get('__url__')} has no json record member")
    try:
        record = json.loads(raw["json"])
    except ValueError as e:  # also UnicodeDecodeError
        raise DataError(f"sample {key}: its json record is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise DataError(f"sample {key}: its json record is a {type(record).__name__}, not an object")
    img_key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in raw), None)
    if img_key is None:
        raise DataError(f"sample {key} in {raw.get('__url__')} has no image member (jpg)")

    def load(name: str, b: bytes) -> Image.Image:
        try:
            with Image.open(io.BytesIO(b)) as im:
                im.load()
                return im.copy()
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            raise DataError(f"sample {key}: member {name} is not a decodable image ({e})") from None

    members = {k: load(k, v) for k, v in raw.items() if k.endswith((".png", ".jpg", ".jpeg", ".webp"))}
    return Sample(record.get("key", key), record, load(img_key, raw[img_key]), members)


@dataclass
class DataCounts:
    """Cumulative counts of one rank's stream: events read (samples and broken shards) and bad ones."""

    read: int = 0
    bad: int = 0

    def as_list(self) -> list[int]:
        return [self.read, self.bad]


def too_much_bad_data(read: int, bad: int, max_bad_samples: int, max_bad_fraction: float) -> bool:
    """The limit of ``data.max_bad_samples`` / ``data.max_bad_fraction``: both must be exceeded."""
    return bad > max_bad_samples and bad > max_bad_fraction * max(read, 1)


class ShardStream:
    """An endless, deterministic stream of examples for one rank.

    Each epoch the shard list is permuted with (seed, epoch). With at least as many shards as ranks,
    rank r reads every world-th shard; with fewer, every rank reads all shards and keeps every
    world-th sample. ``position`` = (epoch, raw events read in that epoch) of the last example handed
    out, which is all a resume needs: the stream skips that many raw events without decoding them.
    An event is a raw sample or the break of a broken shard; a sample that cannot be decoded or
    turned into an example (corrupt image, bad or missing json) and a broken shard are skipped,
    reported to ``on_bad`` and counted in ``counts`` (restored on resume), never raised: the trainer
    decides with ``too_much_bad_data`` when to stop.
    """

    def __init__(
        self,
        urls: Sequence[str],
        rules: Rules,
        seed: int,
        rank: int = 0,
        world: int = 1,
        position: tuple[int, int] = (0, 0),
        counts: DataCounts | None = None,
        on_bad: Callable[[BadItem], None] | None = None,
    ) -> None:
        if not urls:
            raise DataError("no shards to read")
        self.urls, self.rules, self.seed = list(urls), rules, seed
        self.rank, self.world = rank, world
        self.start = tuple(position)
        self.counts = counts if counts is not None else DataCounts()
        self.on_bad = on_bad

    def epoch_urls(self, epoch: int) -> tuple[list[str], bool]:
        order = list(self.urls)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        if len(order) >= self.world:
            return order[self.rank :: self.world], False
        return order, True

    def _bad(self, item: BadItem) -> None:
        self.counts.bad += 1
        if self.on_bad is not None:
            self.on_bad(item)

    def __iter__(self) -> Iterator[Example]:
        epoch, skip = self.start
        while True:
            urls, by_sample = self.epoch_urls(epoch)
            produced = 0
            n = 0
            j = -1
            for url in urls:
                for event in iter_shard_events(url):
                    j += 1
                    if by_sample and j % self.world != self.rank:
                        continue
                    n += 1
                    if n <= skip:
                        continue
                    self.counts.read += 1
                    if isinstance(event, BadItem):
                        self._bad(event)
                        continue
                    try:
                        sample = decode_sample(event)
                        ex = make_example(sample, self.rules, sample_rng(self.seed, epoch, sample.key))
                    except Exception as e:  # one bad record must not end a long run
                        self._bad(BadItem(url, str(event.get("__key__", "?")), f"{type(e).__name__}: {e}"))
                        continue
                    if ex is None:
                        continue
                    produced += 1
                    ex.position = (epoch, n)
                    ex.counts = tuple(self.counts.as_list())
                    yield ex
            if produced == 0 and skip == 0:
                raise DataError(
                    f"rank {self.rank} read a whole epoch of {urls} without one usable sample "
                    f"(stage {self.rules.stage} needs kept objects with crops"
                    f"{', including a person' if self.rules.stage == 2 else ''}); "
                    f"{self.counts.bad} of {self.counts.read} items were bad (see the 'skipped' lines)"
                )
            epoch, skip = epoch + 1, 0


class Prefetcher:
    """Runs an iterator in a background thread, ``depth`` items ahead, preserving order."""

    _END = object()

    def __init__(self, it: Iterator[Any], depth: int) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self.thread.start()

    def _run(self, it: Iterator[Any]) -> None:
        try:
            for item in it:
                while not self.stop.is_set():
                    try:
                        self.q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
            self.q.put(e)
            return
        self.q.put(self._END)

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self.q.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self, timeout: float = 30.0) -> None:
        # Join, not just signal: a daemon thread still inside torch/PIL code while the interpreter
        # shuts down can abort the process (seen as SIGABRT of a rank after a successful run).
        self.stop.set()
        self.thread.join(timeout)


@dataclass
class Batch:
    prompts: list[InterleavedPrompt]
    targets: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    time_ids: torch.Tensor  # (B, 6)
    position: tuple[int, int]
    counts: tuple[int, int] = (0, 0)  # DataCounts (read, bad) after the last example


def batches(examples: Iterator[Example], batch_size: int) -> Iterator[Batch]:
    while True:
        items = []
        for ex in examples:
            items.append(ex)
            if len(items) == batch_size:
                break
        if len(items) < batch_size:
            return
        yield Batch(
            [e.prompt for e in items],
            torch.stack([e.target for e in items]),
            torch.tensor([e.time_ids for e in items], dtype=torch.float32),
            items[-1].position,
            items[-1].counts,
        )
