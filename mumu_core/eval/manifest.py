"""Evaluation manifests: the cases to score, and DreamBench-style suites that expand into cases.

A *manifest* lists cases; each case is one interleaved prompt, the reference images its placeholders
refer to, and the images generated from it (one per seed). Paths in a manifest file are relative to
the file's folder, so a manifest and its images can be moved together.

A *suite* is the generator of a manifest: subjects x prompt templates x seeds. ``plan_suite`` turns
it into cases plus the ``python -m mumu_core generate`` commands that produce the missing images.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mumu_core.prompt import ImageRef, InterleavedPrompt, PromptError

MANIFEST_FORMAT = "mumu-eval-manifest"
SUITE_FORMAT = "mumu-eval-suite"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# The "word right after the placeholder": letters/digits with inner hyphens or apostrophes.
_WORD_RE = re.compile(r"^\s*([A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*)")


class ManifestError(ValueError):
    """A manifest or suite is malformed; the message names the case/field and says what to change."""


@dataclass(frozen=True)
class EvalCase:
    """One prompt, its references (in image-number order) and the images generated from it.

    ``phrases``: the detector query per reference, overriding the word after each placeholder.
    ``subject_images``: per reference, the real images CLIP-I and DINO compare against (DreamBench
    compares with every photo of the subject, not only the one that conditioned the generation);
    default: the reference itself.
    """

    id: str
    prompt: str
    references: tuple[Path, ...] = ()
    generated: tuple[Path, ...] = ()
    phrases: tuple[str, ...] | None = None
    subject_images: tuple[tuple[Path, ...], ...] | None = None
    group: str | None = None
    seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ManifestError("every case needs a non-empty string 'id'")
        if self.phrases is not None and len(self.phrases) != len(self.references):
            raise ManifestError(
                f"case {self.id!r}: 'phrases' has {len(self.phrases)} entries for "
                f"{len(self.references)} reference(s): give one detector phrase per reference"
            )
        if self.phrases is not None and any(not str(p).strip() for p in self.phrases):
            raise ManifestError(f"case {self.id!r}: 'phrases' entries must be non-empty words")
        if self.subject_images is not None:
            if len(self.subject_images) != len(self.references):
                raise ManifestError(
                    f"case {self.id!r}: 'subject_images' has {len(self.subject_images)} lists for "
                    f"{len(self.references)} reference(s): give one list of images per reference"
                )
            if any(len(s) == 0 for s in self.subject_images):
                raise ManifestError(f"case {self.id!r}: a 'subject_images' list is empty")
        if self.seeds is not None and len(self.seeds) != len(self.generated):
            raise ManifestError(
                f"case {self.id!r}: 'seeds' has {len(self.seeds)} entries for {len(self.generated)} "
                "generated image(s): give one seed per generated image or leave 'seeds' out"
            )
        # Validates placeholder syntax and the image count now, not halfway through a long run.
        self.reference_order()

    def parsed(self) -> tuple[InterleavedPrompt, list[int]]:
        """The parsed prompt and, for each ImageRef in prompt order, the index of its reference."""
        # Distinct stand-in images: ImageRef keeps the very object it was given, so identity tells
        # which reference each placeholder names (``<image2> ... <image1>`` reorders them).
        stand_ins = [Image.new("RGB", (1, 1)) for _ in self.references]
        try:
            prompt = InterleavedPrompt.parse(self.prompt, stand_ins)
        except PromptError as e:
            raise ManifestError(f"case {self.id!r}: {e}") from e
        order = [next(k for k, im in enumerate(stand_ins) if im is ref.image) for ref in prompt.images]
        return prompt, order

    def reference_order(self) -> list[int]:
        return self.parsed()[1]

    @property
    def plain_text(self) -> str:
        """The prompt's text with placeholders removed (the CLIP-T text)."""
        return self.parsed()[0].plain_text

    def object_phrases(self) -> list[str]:
        """Detector phrase per reference (reference order): the override, or the word after its placeholder."""
        if self.phrases is not None:
            return [str(p).strip() for p in self.phrases]
        prompt, order = self.parsed()
        out: list[str | None] = [None] * len(self.references)
        segs = prompt.segments
        for i, seg in enumerate(segs):
            if not isinstance(seg, ImageRef):
                continue
            k = order[sum(isinstance(s, ImageRef) for s in segs[:i])]
            nxt = segs[i + 1] if i + 1 < len(segs) else None
            m = _WORD_RE.match(nxt) if isinstance(nxt, str) else None
            if m is None:
                raise ManifestError(
                    f"case {self.id!r}: reference {k + 1} has no word right after its placeholder in "
                    f"{self.prompt!r}, so the multimodal CLIP score cannot tell what to detect: write the "
                    "object's noun after the placeholder or give 'phrases' in the case"
                )
            out[k] = m.group(1).lower()
        return [p for p in out if p is not None]


@dataclass(frozen=True)
class Manifest:
    cases: tuple[EvalCase, ...]
    name: str = "eval"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for c in self.cases:
            if c.id in seen:
                raise ManifestError(f"case id {c.id!r} appears twice: case ids must be unique")
            seen.add(c.id)


def _paths(value, base: Path, where: str) -> tuple[Path, ...]:
    if isinstance(value, str):
        raise ManifestError(f"{where} must be a list of paths, got the single string {value!r}")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ManifestError(f"{where} must be a list of path strings")
    return tuple((base / v) if not Path(v).is_absolute() else Path(v) for v in value)


def case_from_dict(d: dict, base: Path) -> EvalCase:
    if not isinstance(d, dict):
        raise ManifestError(f"every case must be a JSON object, got {type(d).__name__}")
    cid = d.get("id")
    known = {"id", "prompt", "references", "generated", "phrases", "subject_images", "group", "seeds"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"case {cid!r}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    if not isinstance(d.get("prompt"), str):
        raise ManifestError(f"case {cid!r}: 'prompt' (a string with <image> placeholders) is required")
    for key, kind in (("phrases", str), ("seeds", int)):
        v = d.get(key)
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, kind) for x in v)):
            raise ManifestError(
                f"case {cid!r}: {key!r} must be a list of {kind.__name__}s, one per reference/image"
            )
    subj = d.get("subject_images")
    if subj is not None and not isinstance(subj, list):
        raise ManifestError(
            f"case {cid!r}: 'subject_images' must be a list with one list of paths per reference"
        )
    return EvalCase(
        id=str(cid) if cid is not None else "",
        prompt=d["prompt"],
        references=_paths(d.get("references", []), base, f"case {cid!r} 'references'"),
        generated=_paths(d.get("generated", []), base, f"case {cid!r} 'generated'"),
        phrases=tuple(d["phrases"]) if d.get("phrases") is not None else None,
        subject_images=(
            tuple(_paths(s, base, f"case {cid!r} 'subject_images'") for s in subj)
            if subj is not None
            else None
        ),
        group=d.get("group"),
        seeds=tuple(int(s) for s in d["seeds"]) if d.get("seeds") is not None else None,
    )


def _rel(p: Path, base: Path) -> str:
    try:
        return p.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(p.resolve())


def case_to_dict(c: EvalCase, base: Path) -> dict:
    d: dict = {
        "id": c.id,
        "prompt": c.prompt,
        "references": [_rel(p, base) for p in c.references],
        "generated": [_rel(p, base) for p in c.generated],
    }
    if c.phrases is not None:
        d["phrases"] = list(c.phrases)
    if c.subject_images is not None:
        d["subject_images"] = [[_rel(p, base) for p in s] for s in c.subject_images]
    if c.group is not None:
        d["group"] = c.group
    if c.seeds is not None:
        d["seeds"] = list(c.seeds)
    return d


def load_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist: write one (see docs/EVAL.md) or run 'plan'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"manifest {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f'{path} is not an evaluation manifest: expected "format": "{MANIFEST_FORMAT}"')
    if data.get("version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest version {data.get('version')!r} unsupported (want {FORMAT_VERSION})"
        )
    if not isinstance(data.get("cases"), list):
        raise ManifestError(f"{path}: 'cases' must be a list")
    base = path.parent
    return Manifest(tuple(case_from_dict(d, base) for d in data["cases"]), name=str(data.get("name", "eval")))


def save_manifest(manifest: Manifest, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent
    data = {
        "format": MANIFEST_FORMAT,
        "version": FORMAT_VERSION,
        "name": manifest.name,
        "cases": [case_to_dict(c, base) for c in manifest.cases],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# DreamBench-style suites

# DreamBench (Ruiz et al. 2023, google/dreambooth dataset/prompts_and_classes.txt): {0} is the
# subject's unique token, {1} its class noun. Here {0} becomes the image placeholder.
DREAMBENCH_OBJECT_PROMPTS = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)
DREAMBENCH_LIVE_PROMPTS = DREAMBENCH_OBJECT_PROMPTS[:10] + (
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)
# subject folder -> (class noun, live?)
DREAMBENCH_SUBJECTS: dict[str, tuple[str, bool]] = {
    "backpack": ("backpack", False),
    "backpack_dog": ("backpack", False),
    "bear_plushie": ("stuffed animal", False),
    "berry_bowl": ("bowl", False),
    "can": ("can", False),
    "candle": ("candle", False),
    "cat": ("cat", True),
    "cat2": ("cat", True),
    "clock": ("clock", False),
    "colorful_sneaker": ("sneaker", False),
    "dog": ("dog", True),
    "dog2": ("dog", True),
    "dog3": ("dog", True),
    "dog5": ("dog", True),
    "dog6": ("dog", True),
    "dog7": ("dog", True),
    "dog8": ("dog", True),
    "duck_toy": ("toy", False),
    "fancy_boot": ("boot", False),
    "grey_sloth_plushie": ("stuffed animal", False),
    "monster_toy": ("toy", False),
    "pink_sunglasses": ("glasses", False),
    "poop_emoji": ("toy", False),
    "rc_car": ("toy", False),
    "red_cartoon": ("cartoon", False),
    "robot_toy": ("toy", False),
    "shiny_sneaker": ("sneaker", False),
    "teapot": ("teapot", False),
    "vase": ("vase", False),
    "wolf_plushie": ("stuffed animal", False),
}
DEFAULT_SEEDS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Subject:
    id: str
    noun: str
    images: tuple[Path, ...]
    live: bool = False


@dataclass(frozen=True)
class Suite:
    """Subjects x prompt templates x seeds.

    Templates use DreamBench's ``{0}`` (the subject: becomes ``<image>``) and ``{1}`` (its class
    noun). ``reference_index`` picks which subject photo conditions generation; CLIP-I and DINO
    compare against all of the subject's photos.
    """

    name: str
    subjects: tuple[Subject, ...]
    object_prompts: tuple[str, ...]
    live_prompts: tuple[str, ...]
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    reference_index: int = 0
    generate_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.subjects:
            raise ManifestError("the suite has no subjects")
        if not self.seeds:
            raise ManifestError("the suite has no seeds: give at least one")
        for t in (*self.object_prompts, *self.live_prompts):
            if "{0}" not in t or "{1}" not in t:
                raise ManifestError(
                    f"prompt template {t!r} must contain {{0}} (the subject image) and {{1}} (its class noun)"
                )
        for s in self.subjects:
            if not s.images:
                raise ManifestError(f"subject {s.id!r} has no images")
            if not 0 <= self.reference_index < len(s.images):
                raise ManifestError(
                    f"reference_index {self.reference_index} is out of range for subject {s.id!r} "
                    f"({len(s.images)} images)"
                )
            if not (self.live_prompts if s.live else self.object_prompts):
                raise ManifestError(
                    f"subject {s.id!r} is {'live' if s.live else 'an object'} but that prompt list is empty"
                )


def _list_images(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))


def load_suite(path: str | Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"suite {path} does not exist: write one (docs/EVAL.md) or run 'dreambench-suite'"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"suite {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != SUITE_FORMAT:
        raise ManifestError(f'{path} is not a suite: expected "format": "{SUITE_FORMAT}"')
    base = path.parent
    subjects = []
    for s in data.get("subjects", []):
        if not isinstance(s, dict) or "id" not in s or "class" not in s or "images" not in s:
            raise ManifestError(
                f"{path}: every subject needs 'id', 'class' and 'images' (a folder or a list)"
            )
        imgs = s["images"]
        if isinstance(imgs, str):
            folder = base / imgs
            if not folder.is_dir():
                raise ManifestError(f"subject {s['id']!r}: image folder {folder} does not exist")
            paths = _list_images(folder)
        else:
            paths = _paths(imgs, base, f"subject {s['id']!r} 'images'")
        subjects.append(Subject(str(s["id"]), str(s["class"]), paths, bool(s.get("live", False))))
    prompts = data.get("prompts", {})
    if isinstance(prompts, list):
        prompts = {"object": prompts, "live": prompts}
    return Suite(
        name=str(data.get("name", path.stem)),
        subjects=tuple(subjects),
        object_prompts=tuple(prompts.get("object", ())),
        live_prompts=tuple(prompts.get("live", ())),
        seeds=tuple(int(x) for x in data.get("seeds", DEFAULT_SEEDS)),
        reference_index=int(data.get("reference_index", 0)),
        generate_args=tuple(str(a) for a in data.get("generate_args", ())),
    )


def save_suite(suite: Suite, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.parent
    data = {
        "format": SUITE_FORMAT,
        "version": FORMAT_VERSION,
        "name": suite.name,
        "seeds": list(suite.seeds),
        "reference_index": suite.reference_index,
        "generate_args": list(suite.generate_args),
        "prompts": {"object": list(suite.object_prompts), "live": list(suite.live_prompts)},
        "subjects": [
            {"id": s.id, "class": s.noun, "live": s.live, "images": [_rel(p, base) for p in s.images]}
            for s in suite.subjects
        ],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def dreambench_suite(dataset_dir: str | Path, seeds: Sequence[int] = DEFAULT_SEEDS, **kw) -> Suite:
    """The DreamBench suite over a local copy of google/dreambooth's ``dataset/`` folder."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ManifestError(
            f"DreamBench dataset folder {root} does not exist: point it at the 'dataset' folder of the "
            "google/dreambooth repository (one sub-folder of photos per subject, e.g. dataset/dog/00.jpg)"
        )
    subjects = []
    missing = []
    for sid, (noun, live) in DREAMBENCH_SUBJECTS.items():
        folder = root / sid
        if not folder.is_dir() or not _list_images(folder):
            missing.append(sid)
            continue
        subjects.append(Subject(sid, noun, _list_images(folder), live))
    if missing:
        raise ManifestError(
            f"{root} lacks photos for DreamBench subject(s) {missing}: the full protocol needs all 30 "
            "subjects; for a partial run write the suite JSON yourself (docs/EVAL.md)"
        )
    return Suite(
        name="dreambench",
        subjects=tuple(subjects),
        object_prompts=DREAMBENCH_OBJECT_PROMPTS,
        live_prompts=DREAMBENCH_LIVE_PROMPTS,
        seeds=tuple(seeds),
        **kw,
    )


@dataclass(frozen=True)
class GenerateJob:
    """One image to generate: the generator's arguments (without ``--out``) and the file it must become."""

    out: Path
    argv: tuple[str, ...]


def plan_suite(suite: Suite, out_dir: str | Path) -> tuple[Manifest, list[GenerateJob]]:
    """Expand the suite into one case per (subject, prompt) and one generate job per seed.

    Generated images are named ``<out_dir>/<subject>/<prompt index>_s<seed>.png``. Paths are
    absolute so that the script runs from any working directory.
    """
    out_dir = Path(out_dir).resolve()
    cases: list[EvalCase] = []
    jobs: list[GenerateJob] = []
    for s in suite.subjects:
        templates = suite.live_prompts if s.live else suite.object_prompts
        ref = s.images[suite.reference_index].resolve()
        for pi, t in enumerate(templates):
            prompt = t.replace("{0}", "<image>").replace("{1}", s.noun)
            gen = tuple(out_dir / s.id / f"{pi:02d}_s{seed}.png" for seed in suite.seeds)
            cases.append(
                EvalCase(
                    id=f"{s.id}-{pi:02d}",
                    prompt=prompt,
                    references=(ref,),
                    generated=gen,
                    # The whole class noun ("stuffed animal"), not just the word after the placeholder.
                    phrases=(s.noun,),
                    subject_images=(tuple(p.resolve() for p in s.images),),
                    group=s.id,
                    seeds=suite.seeds,
                )
            )
            for seed, g in zip(suite.seeds, gen):
                argv = ("--prompt", prompt, "--image", str(ref), "--seed", str(seed), *suite.generate_args)
                jobs.append(GenerateJob(g, argv))
    return Manifest(tuple(cases), name=suite.name), jobs


def write_generate_script(
    jobs: Sequence[GenerateJob],
    path: str | Path,
    generate_cmd: str = "python -m mumu_core generate",
    extra_args: Sequence[str] = (),
    skip_existing: bool = True,
) -> Path:
    """A bash script with one generate command per image.

    ``python -m mumu_core generate --out`` takes a folder and names its PNGs itself, so each command
    writes into a fresh temporary folder next to the target and its single PNG is renamed to the
    planned name; the rename is atomic, so an interrupted run never leaves a partial image, and
    reruns skip images that already exist (unless ``skip_existing`` is False).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "#!/usr/bin/env bash",
        "# Written by: python -m mumu_core.eval plan. One image per line; rerun to resume.",
        "set -euo pipefail",
        "",
    ]
    extra = shlex.join(extra_args)
    for job in jobs:
        out, parent = shlex.quote(str(job.out)), shlex.quote(str(job.out.parent))
        cmd = f"{generate_cmd} {shlex.join(job.argv)}" + (f" {extra}" if extra else "")
        body = (
            f'mkdir -p {parent} && d=$(mktemp -d {parent}/.gen.XXXXXX) && {cmd} --out "$d" && '
            f'mv "$d"/*.png {out} && rmdir "$d"'
        )
        lines.append(f"[ -f {out} ] || {{ {body}; }}" if skip_existing else f"{{ {body}; }}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path
