"""MUMU-mini evaluation: does the generated image show the referenced object / style?

The harness is model-agnostic. It takes a generator

    generate(prompts: Sequence[MiniPrompt], guidance: float, seed: int) -> Sequence[PIL.Image]

builds deterministic held-out cases from the mini world, runs the suites at the demo guidance scale and over
a guidance sweep, judges every image with the analyser (analyser.py) and writes results.json, results.md and
contact sheets (PNG) to a folder. Suites (issue 6, item 4):

- ``single``: one object reference; colour / shape fidelity vs the text-only baseline and chance.
- ``pair``: two crops from different source images in one prompt (paper Finding 2).
- ``tokens``: single-object fidelity vs tokens per image (Finding 1).
- ``style``: background style taken from a background-only reference (Finding 3).

Two diagnostics of Finding 2 run only when named in ``--suites`` (not part of the targets):

- ``pair_same_image``: the pair suite's colours and shapes with both crops cut from ONE two-object image,
  as training's data builds its prompts (is it the crops' different sources that pairs lose to?);
- ``pair_one_reference``: the pair suite's two-object captions with only the first object referenced, the
  other a bare word (against ``single``: what drawing two objects costs a reference; against ``pair``:
  what a second reference costs it).

Chance is what a perfect renderer with uniformly random attributes would score under the same matching
rules (exact for single/style, Monte Carlo for pair). Cases are balanced over colours, shapes and styles,
so a generator that ignores the references scores chance in expectation.

Model adapters call ``prompt.to_interleaved()`` and must use only its text and images;
``MiniPrompt.references`` is ground truth for the oracle, the report and the contact sheets.

    python -m mumu_core.mini.evaluate --generator oracle --out runs/mini-eval-oracle
    python -m mumu_core.mini.evaluate --generator pipeline --vlm M/vlm --sdxl M/sdxl --bundle B.safetensors \
        --out runs/mini-eval
    python -m mumu_core.mini.evaluate --generator my_module:make_generator --out runs/mini-eval
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..cli_help import first_line
from .analyser import Analyser, Analysis
from .base_t2i import FRAMED_MAX_BRIGHTNESS, frame_score
from .world import (
    CATEGORY_WORDS,
    COLOURS,
    DEFAULT_WORLD,
    SHAPES,
    STYLES,
    WorldConfig,
    build_caption,
    generate_scene,
    interleave,
    object_crop,
    render,
    scene_at,
    style_reference,
)

SUITES: tuple[str, ...] = ("single", "pair", "tokens", "style")
# Run only when named: where a pair loses its shapes (module docstring).
DIAGNOSTIC_SUITES: tuple[str, ...] = ("pair_same_image", "pair_one_reference")
# No space between a placeholder and its word ("a <image>shape"): training's data rules insert each crop
# right before its word, so prompts of this form tokenize exactly like the training prompts.
PROMPT_SEP = ""
# Index ranges of the eval split used by each suite, so suites never share a source scene.
_SUITE_BASE = {"single": 0, "pair": 100_000, "style": 200_000, "pair_same_image": 300_000}


@dataclass(frozen=True)
class Reference:
    """What a reference image shows (ground truth)."""

    kind: Literal["object", "style"]
    colour: str | None = None
    shape: str | None = None
    style: str | None = None


@dataclass(frozen=True)
class MiniPrompt:
    """A prompt of the mini evaluation: text with ``<image>`` placeholders and the images, in order."""

    text: str
    images: tuple[Image.Image, ...]
    references: tuple[Reference, ...]  # ground truth per image; never for a model's eyes
    n_objects: int  # how many objects the caption names
    tokens_per_image: int

    def __post_init__(self) -> None:
        if len(self.images) != len(self.references):
            raise ValueError(f"{len(self.images)} images but {len(self.references)} references")
        if self.text.count("<image>") != len(self.images):
            raise ValueError(
                f"{self.text!r} has {self.text.count('<image>')} placeholders for {len(self.images)} images"
            )

    @property
    def plain_text(self) -> str:
        return " ".join(self.text.replace("<image>", " ").split())

    def without_images(self) -> MiniPrompt:
        """The text-only baseline: same words, no image tokens (and no ground truth left to copy)."""
        return MiniPrompt(self.plain_text, (), (), self.n_objects, self.tokens_per_image)

    def with_tokens(self, tokens: int) -> MiniPrompt:
        return replace(self, tokens_per_image=tokens)

    def to_interleaved(self) -> Any:
        """The ``mumu_core.prompt.InterleavedPrompt`` a model encodes."""
        from ..prompt import InterleavedPrompt

        return InterleavedPrompt.parse(self.text, self.images, tokens_per_image=self.tokens_per_image)


GenerateFn = Callable[[Sequence[MiniPrompt], float, int], Sequence[Image.Image]]


@dataclass(frozen=True)
class Case:
    suite: str
    prompt: MiniPrompt
    # Expected (colour, shape) per referenced object, or the expected style.
    objects: tuple[tuple[str, str], ...] = ()
    style: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    n_single: int = 96
    n_pair: int = 60
    n_style: int = 48
    # Demo settings; None takes them from the mini preset (mumu_core.presets.MINI).
    guidance: float | None = None
    tokens_per_image: int | None = None
    guidance_sweep: tuple[float, ...] = (1.0, 1.5, 2.5, 4.0)
    tokens_sweep: tuple[int, ...] = (1, 4, 9, 16)
    # Whether the tokens suite runs at every guidance of the sweep or only at the demo guidance.
    tokens_at_every_guidance: bool = True
    suites: tuple[str, ...] = SUITES
    seed: int = 0
    batch_size: int = 48
    sheet_rows: int = 12
    chance_draws: int = 200

    def resolved(self) -> EvalConfig:
        g, t = self.guidance, self.tokens_per_image
        if g is None or t is None:
            from ..presets import MINI

            g = MINI.guidance_scale if g is None else g
            t = MINI.tokens_per_image if t is None else t
        bad = set(self.suites) - set(SUITES + DIAGNOSTIC_SUITES)
        if bad:
            raise ValueError(f"unknown suite(s) {sorted(bad)}; choose from {SUITES + DIAGNOSTIC_SUITES}")
        return replace(self, guidance=float(g), tokens_per_image=int(t))

    @property
    def guidances(self) -> tuple[float, ...]:
        assert self.guidance is not None
        return tuple(sorted({float(self.guidance), *map(float, self.guidance_sweep)}))


# ------------------------------------------------------------------------------------------------ cases


def _word(rng: np.random.Generator) -> str:
    return CATEGORY_WORDS[int(rng.integers(len(CATEGORY_WORDS)))]


def single_cases(n: int, tokens: int, cfg: WorldConfig = DEFAULT_WORLD, seed: int = 0) -> list[Case]:
    """Balanced over colour x shape: case i references colour i % 6 and shape (i // 6) % 4."""
    rng = np.random.default_rng([seed, 1])
    cases = []
    for i in range(n):
        colour, shape = COLOURS[i % len(COLOURS)], SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        src = scene_at("eval", _SUITE_BASE["single"] + i, cfg, n_objects=1, colours=[colour], shapes=[shape])
        caption, spans, _ = build_caption([_word(rng)], "background")
        text = interleave(caption, [(spans[0][0], "")], sep=PROMPT_SEP)
        prompt = MiniPrompt(text, (object_crop(src, 0),), (Reference("object", colour, shape),), 1, tokens)
        cases.append(Case("single", prompt, objects=((colour, shape),)))
    return cases


def pair_cases(n: int, tokens: int, cfg: WorldConfig = DEFAULT_WORLD, seed: int = 0) -> list[Case]:
    """Two crops from two different source images; the two objects differ in colour and in shape, so that
    mixing them up is measurable. Colours cycle through all ordered pairs."""
    rng = np.random.default_rng([seed, 2])
    colour_pairs = list(itertools.permutations(COLOURS, 2))
    shape_pairs = list(itertools.permutations(SHAPES, 2))
    cases = []
    for i in range(n):
        c1, c2 = colour_pairs[(i * 7) % len(colour_pairs)]
        s1, s2 = shape_pairs[i % len(shape_pairs)]
        refs, images = [], []
        for j, (c, s) in enumerate(((c1, s1), (c2, s2))):
            src = scene_at("eval", _SUITE_BASE["pair"] + 2 * i + j, cfg, n_objects=1, colours=[c], shapes=[s])
            images.append(object_crop(src, 0))
            refs.append(Reference("object", c, s))
        caption, spans, _ = build_caption([_word(rng), _word(rng)], "background")
        text = interleave(caption, [(spans[0][0], ""), (spans[1][0], "")], sep=PROMPT_SEP)
        prompt = MiniPrompt(text, tuple(images), tuple(refs), 2, tokens)
        cases.append(Case("pair", prompt, objects=((c1, s1), (c2, s2))))
    return cases


def pair_same_image_cases(n: int, tokens: int, cfg: WorldConfig = DEFAULT_WORLD, seed: int = 0) -> list[Case]:
    """The pair suite's colour and shape pairs, both crops cut from one two-object image."""
    rng = np.random.default_rng([seed, 4])
    cases = []
    for i, pair in enumerate(pair_cases(n, tokens, cfg, seed)):
        colours, shapes = [c for c, _ in pair.objects], [s for _, s in pair.objects]
        src = scene_at(
            "eval", _SUITE_BASE["pair_same_image"] + i, cfg, n_objects=2, colours=colours, shapes=shapes
        )
        caption, spans, _ = build_caption([_word(rng), _word(rng)], "background")
        text = interleave(caption, [(spans[0][0], ""), (spans[1][0], "")], sep=PROMPT_SEP)
        images = (object_crop(src, 0), object_crop(src, 1))
        prompt = MiniPrompt(text, images, pair.prompt.references, 2, tokens)
        cases.append(Case("pair_same_image", prompt, objects=pair.objects))
    return cases


def pair_one_reference_cases(
    n: int, tokens: int, cfg: WorldConfig = DEFAULT_WORLD, seed: int = 0
) -> list[Case]:
    """The pair suite's first crop before the first of two object words; the second word has none."""
    rng = np.random.default_rng([seed, 5])
    cases = []
    for pair in pair_cases(n, tokens, cfg, seed):
        caption, spans, _ = build_caption([_word(rng), _word(rng)], "background")
        text = interleave(caption, [(spans[0][0], "")], sep=PROMPT_SEP)
        prompt = MiniPrompt(text, pair.prompt.images[:1], pair.prompt.references[:1], 2, tokens)
        cases.append(Case("pair_one_reference", prompt, objects=pair.objects[:1]))
    return cases


def style_cases(n: int, tokens: int, cfg: WorldConfig = DEFAULT_WORLD, seed: int = 0) -> list[Case]:
    """A background-only patch as the reference of the word "background"; styles cycle."""
    rng = np.random.default_rng([seed, 3])
    cases = []
    for i in range(n):
        style = STYLES[i % len(STYLES)]
        src = scene_at(
            "eval", _SUITE_BASE["style"] + i, cfg, n_objects=1, style=style, require_style_box=True
        )
        caption, _, bg_span = build_caption([_word(rng)], "background")
        text = interleave(caption, [(bg_span[0], "")], sep=PROMPT_SEP)
        prompt = MiniPrompt(text, (style_reference(src),), (Reference("style", style=style),), 1, tokens)
        cases.append(Case("style", prompt, style=style))
    return cases


# ---------------------------------------------------------------------------------------------- scoring


def _pair_score(expected: Sequence[tuple[str, str]], found: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Best one-to-one assignment of found objects to expected ones (max total matches, colour first)."""
    best: tuple[int, int] | None = None
    best_perm: tuple[int, ...] = ()
    k = min(len(found), len(expected))
    for perm in itertools.permutations(range(len(found)), k):
        c = sum(found[p][0] == expected[j][0] for j, p in enumerate(perm))
        s = sum(found[p][1] == expected[j][1] for j, p in enumerate(perm))
        if best is None or (c + s, c) > (best[0] + best[1], best[0]):
            best, best_perm = (c, s), perm
    n = len(expected)
    colours = [found[p][0] == expected[j][0] for j, p in enumerate(best_perm)] + [False] * (n - k)
    shapes = [found[p][1] == expected[j][1] for j, p in enumerate(best_perm)] + [False] * (n - k)
    return {
        "both_colours": float(all(colours)),
        "both_shapes": float(all(shapes)),
        "both_all": float(all(colours) and all(shapes)),
        "colour": float(np.mean(colours)),
        "shape": float(np.mean(shapes)),
    }


def _one_reference_score(expected: tuple[str, str], found: Sequence[tuple[str, str]]) -> dict[str, float]:
    """The referenced object among the (up to two) found ones: its colour, its colour and shape together,
    and whether the reference's colour is on both objects (leaked onto the word it was not given to)."""
    colour, shape = expected
    return {
        "colour": float(any(c == colour for c, _ in found)),
        "both": float(any(c == colour and s == shape for c, s in found)),
        "colour_on_both": float(len(found) >= 2 and all(c == colour for c, _ in found)),
    }


def score_case(case: Case, analysis: Analysis) -> dict[str, float]:
    dets = analysis.detections
    if case.suite in ("single", "tokens"):
        (colour, shape) = case.objects[0]
        if not dets:
            return {"found": 0.0, "colour": 0.0, "shape": 0.0, "both": 0.0}
        c, s = dets[0].colour == colour, dets[0].shape == shape
        return {"found": 1.0, "colour": float(c), "shape": float(s), "both": float(c and s)}
    if case.suite in ("pair", *DIAGNOSTIC_SUITES):
        found = [(d.colour, d.shape) for d in dets[:2]]
        if case.suite == "pair_one_reference":
            return {"found_two": float(len(dets) >= 2), **_one_reference_score(case.objects[0], found)}
        return {"found_two": float(len(dets) >= 2), **_pair_score(case.objects, found)}
    if case.suite == "style":
        return {"style": float(analysis.style == case.style), "found": float(bool(dets))}
    raise ValueError(f"unknown suite {case.suite!r}")


def chance(cases: Sequence[Case], draws: int = 200, seed: int = 0) -> dict[str, float]:
    """Expected score of a perfect renderer drawing attributes uniformly at random."""
    if not cases:
        return {}
    suite = cases[0].suite
    if suite in ("single", "tokens"):
        return {
            "colour": 1 / len(COLOURS),
            "shape": 1 / len(SHAPES),
            "both": 1 / (len(COLOURS) * len(SHAPES)),
        }
    if suite == "style":
        return {"style": 1 / len(STYLES)}
    rng = np.random.default_rng([seed, 99])
    acc: dict[str, float] = {}
    for case in cases:
        for _ in range(draws):
            found = [
                (COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
                for _ in range(case.prompt.n_objects)
            ]
            score = (
                _one_reference_score(case.objects[0], found)
                if suite == "pair_one_reference"
                else _pair_score(case.objects, found)
            )
            for k, v in score.items():
                acc[k] = acc.get(k, 0.0) + v
    return {k: v / (len(cases) * draws) for k, v in acc.items()}


# ------------------------------------------------------------------------------------------- generators


def _render_for(
    prompt: MiniPrompt, rng: np.random.Generator, cfg: WorldConfig, use_refs: bool
) -> Image.Image:
    objs = [r for r in prompt.references if r.kind == "object"] if use_refs else []
    styles = [r for r in prompt.references if r.kind == "style"] if use_refs else []
    n = prompt.n_objects
    colours = [r.colour for r in objs] + [
        COLOURS[int(rng.integers(len(COLOURS)))] for _ in range(n - len(objs))
    ]
    shapes = [r.shape for r in objs] + [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n - len(objs))]
    scene = generate_scene(
        rng,
        cfg,
        n_objects=n,
        colours=colours,  # type: ignore[arg-type]
        shapes=shapes,  # type: ignore[arg-type]
        style=styles[0].style if styles else None,
        split="eval",
    )
    return render(scene)


def oracle_generator(cfg: WorldConfig = DEFAULT_WORLD) -> GenerateFn:
    """Renders exactly what the references show (random attributes where the prompt has none): the
    ceiling of the harness. On text-only prompts it has nothing to copy and scores chance."""

    def generate(prompts: Sequence[MiniPrompt], guidance: float, seed: int) -> list[Image.Image]:
        del guidance
        return [_render_for(p, np.random.default_rng([seed, i]), cfg, True) for i, p in enumerate(prompts)]

    return generate


def random_generator(cfg: WorldConfig = DEFAULT_WORLD) -> GenerateFn:
    """Ignores the references: a valid scene with the named number of objects and random attributes."""

    def generate(prompts: Sequence[MiniPrompt], guidance: float, seed: int) -> list[Image.Image]:
        del guidance
        return [_render_for(p, np.random.default_rng([seed, i]), cfg, False) for i, p in enumerate(prompts)]

    return generate


def pipeline_generator(
    vlm: str | Path,
    bundle: str | Path,
    sdxl: str | Path,
    steps: int | str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    lora_scale: float | str = 1.0,
) -> GenerateFn:
    """A trained MUMU-mini model through the standalone pipeline (local paths only, nothing downloaded).

    ``lora_scale`` is the strength of the bundle's UNet LoRA; 0 for a UNet the LoRA was already merged
    into (``python -m mumu_core fuse``, Finding 4).

    Prompt ``k`` of a call gets seed ``seed + k`` (the pipeline's convention); the harness passes each
    batch's start index as its seed offset, so every case has its own, batching-independent noise.
    """
    import torch

    from ..pipeline import MumuPipeline

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ValueError(f"dtype {dtype!r}: use a torch dtype name such as float32 or bfloat16")
    pipe = MumuPipeline.from_paths(
        vlm, bundle, sdxl, device=device, dtype=getattr(torch, dtype), lora_scale=float(lora_scale)
    )
    n_steps = int(steps) if steps is not None else None

    def generate(prompts: Sequence[MiniPrompt], guidance: float, seed: int) -> list[Image.Image]:
        return pipe(
            [p.to_interleaved() for p in prompts], seed=seed, steps=n_steps, guidance=guidance, progress=False
        )

    return generate


def load_generator(spec: str, **kwargs: Any) -> GenerateFn:
    """``oracle``, ``random``, ``pipeline`` (kwargs of `pipeline_generator`) or ``module:factory``
    (``factory(**kwargs)`` returns a generate callable)."""
    if spec == "oracle":
        return oracle_generator()
    if spec == "random":
        return random_generator()
    if spec == "pipeline":
        missing = {"vlm", "bundle", "sdxl"} - set(kwargs)
        if missing:
            raise ValueError(
                f"the pipeline generator needs local paths for {sorted(missing)} (--vlm, --bundle, --sdxl)"
            )
        return pipeline_generator(**kwargs)
    if ":" not in spec:
        raise ValueError(
            f"generator {spec!r}: use 'oracle', 'random', 'pipeline' or 'package.module:factory'"
        )
    module, _, name = spec.partition(":")
    factory = getattr(importlib.import_module(module), name, None)
    if factory is None:
        raise ValueError(f"generator {spec!r}: module {module!r} has no attribute {name!r}")
    return factory(**kwargs)


# --------------------------------------------------------------------------------------------------- run


@dataclass
class EvalReport:
    config: dict
    analyser: dict
    chance: dict[str, dict[str, float]]
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    # "single g=<guidance> <condition>" -> counts[reference shape][detected shape], last column: no object.
    # A model that renders shapes but ignores the reference's has flat rows.
    shape_confusion: dict[str, list[list[int]]] = field(default_factory=dict)

    def row(self, **match: Any) -> dict:
        hits = [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} rows match {match}")
        return hits[0]


def _generate(
    generate: GenerateFn, prompts: Sequence[MiniPrompt], guidance: float, seed: int, batch: int, desc: str
) -> list[Image.Image]:
    out: list[Image.Image] = []
    for b in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        chunk = list(prompts[b : b + batch])
        # The start index in the seed: a case gets the same noise in every condition and guidance, and
        # with the pipeline's seed + k convention every case has its own seed whatever the batching.
        images = list(generate(chunk, guidance, seed + b))
        if len(images) != len(chunk):
            raise RuntimeError(f"generator returned {len(images)} images for {len(chunk)} prompts")
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"generator must return PIL images, got {type(im).__name__}")
        out.extend(images)
    return out


def shape_confusion(cases: Sequence[Case], analyses: Sequence[Analysis]) -> list[list[int]]:
    """Single-object cases: counts[reference shape][largest detection's shape], last column no object."""
    counts = np.zeros((len(SHAPES), len(SHAPES) + 1), dtype=int)
    for case, analysis in zip(cases, analyses, strict=True):
        found = SHAPES.index(analysis.detections[0].shape) if analysis.detections else len(SHAPES)
        counts[SHAPES.index(case.objects[0][1]), found] += 1
    return counts.tolist()


def _mean(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def _reference_accuracy(analyser: Analyser, cases: Sequence[Case]) -> dict[str, float]:
    """How well the analyser reads the reference crops themselves (pasted on a grey canvas)."""
    images, expected = [], []
    for case in cases:
        for im, ref in zip(case.prompt.images, case.prompt.references, strict=True):
            if ref.kind != "object":
                continue
            canvas = Image.new("RGB", (analyser.canvas, analyser.canvas), (128, 128, 128))
            canvas.paste(im, ((analyser.canvas - im.width) // 2, (analyser.canvas - im.height) // 2))
            images.append(canvas)
            expected.append((ref.colour, ref.shape))
    if not images:
        return {}
    res = analyser.analyse(images, max_objects=1)
    colour = [
        bool(r.detections) and r.detections[0].colour == e[0] for r, e in zip(res, expected, strict=True)
    ]
    shape = [bool(r.detections) and r.detections[0].shape == e[1] for r, e in zip(res, expected, strict=True)]
    return {"n": len(images), "colour": float(np.mean(colour)), "shape": float(np.mean(shape))}


def run_evaluation(
    generate: GenerateFn,
    out_dir: str | Path,
    cfg: EvalConfig = EvalConfig(),
    analyser: Analyser | None = None,
    world: WorldConfig = DEFAULT_WORLD,
) -> EvalReport:
    """Run the suites, write results.json / results.md / contact sheets into `out_dir`, return the report."""
    cfg = cfg.resolved()
    analyser = analyser or Analyser.load()
    if analyser.canvas != world.canvas:
        raise ValueError(f"analyser works at {analyser.canvas}px, the world at {world.canvas}px: retrain it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assert cfg.tokens_per_image is not None and cfg.guidance is not None

    cases: dict[str, list[Case]] = {}
    if "single" in cfg.suites or "tokens" in cfg.suites:
        cases["single"] = single_cases(cfg.n_single, cfg.tokens_per_image, world, cfg.seed)
    if "pair" in cfg.suites:
        cases["pair"] = pair_cases(cfg.n_pair, cfg.tokens_per_image, world, cfg.seed)
    if "style" in cfg.suites:
        cases["style"] = style_cases(cfg.n_style, cfg.tokens_per_image, world, cfg.seed)
    if "pair_same_image" in cfg.suites:
        cases["pair_same_image"] = pair_same_image_cases(cfg.n_pair, cfg.tokens_per_image, world, cfg.seed)
    if "pair_one_reference" in cfg.suites:
        cases["pair_one_reference"] = pair_one_reference_cases(
            cfg.n_pair, cfg.tokens_per_image, world, cfg.seed
        )

    report = EvalReport(
        config={**asdict(cfg), "world": asdict(world), "guidances": list(cfg.guidances)},
        analyser={
            "heldout_accuracy": analyser.meta.get("heldout_accuracy"),
            "reference_accuracy": _reference_accuracy(
                analyser, [c for k in ("single", "pair", "pair_same_image") for c in cases.get(k, [])]
            ),
        },
        chance={k: chance(v, cfg.chance_draws, cfg.seed) for k, v in cases.items()},
    )
    sheets: dict[str, list[list[tuple[Image.Image, Note]]]] = {}

    def run(suite: str, cs: Sequence[Case], guidance: float, condition: str, tokens: int | None) -> None:
        prompts = [c.prompt if condition == "image" else c.prompt.without_images() for c in cs]
        if tokens is not None:
            prompts = [p.with_tokens(tokens) for p in prompts]
        images = _generate(
            generate, prompts, guidance, cfg.seed, cfg.batch_size, f"{suite} g={guidance} {condition}"
        )
        analyses = analyser.analyse(images, max_objects=2)
        scores = [score_case(c, a) for c, a in zip(cs, analyses, strict=True)]
        # The mini fine-tune's look (Finding 4): a dark frame, by the rule the fine-tune is checked with.
        framed = (
            frame_score(np.stack([np.asarray(im.convert("RGB")) for im in images])) < FRAMED_MAX_BRIGHTNESS
        )
        if suite == "single":
            report.shape_confusion[f"single g={guidance:g} {condition}"] = shape_confusion(cs, analyses)
        report.rows.append(
            {
                "suite": suite,
                "guidance": guidance,
                "condition": condition,
                "tokens": tokens
                if tokens is not None
                else (cfg.tokens_per_image if condition == "image" else 0),
                "n": len(cs),
                **_mean(scores),
                "framed": float(framed.mean()),
            }
        )
        if guidance == cfg.guidance:
            col = [
                (_annotate(im, a, analyser.canvas), _seen(c, a, sc))
                for im, a, c, sc in zip(images, analyses, cs, scores, strict=True)
            ]
            sheets.setdefault(suite, []).append(col[: cfg.sheet_rows])

    for guidance in cfg.guidances:
        for suite in ("single", "pair", "style", *DIAGNOSTIC_SUITES):
            if suite in cfg.suites:
                for condition in ("image", "text_only"):
                    run(suite, cases[suite], guidance, condition, None)
        if "tokens" in cfg.suites and (cfg.tokens_at_every_guidance or guidance == cfg.guidance):
            for t in cfg.tokens_sweep:
                run("tokens", cases["single"], guidance, "image", t)

    report.targets = _targets(report, cfg)
    _write(report, out, cases, sheets, cfg)
    return report


# ------------------------------------------------------------------------------------------------ targets


def tokens_rising(scores: Sequence[float], tolerance: float = 0.05) -> bool:
    """Fidelity rises with tokens: the last is above the first and no step drops by more than `tolerance`."""
    return (
        len(scores) >= 2
        and scores[-1] > scores[0]
        and all(b >= a - tolerance for a, b in zip(scores, scores[1:]))
    )


def _targets(report: EvalReport, cfg: EvalConfig) -> list[dict]:
    g = cfg.guidance
    out: list[dict] = []

    def add(name: str, value: float | list[float], target: str, ok: bool) -> None:
        out.append({"name": name, "guidance": g, "value": value, "target": target, "pass": bool(ok)})

    rows = report.rows
    if "single" in cfg.suites:
        img = report.row(suite="single", guidance=g, condition="image")
        txt = report.row(suite="single", guidance=g, condition="text_only")
        ch = report.chance["single"]
        add("single: colour", img["colour"], ">= 0.95", img["colour"] >= 0.95)
        add("single: shape", img["shape"], ">= 0.85", img["shape"] >= 0.85)
        for k in ("colour", "shape"):
            add(f"text-only: {k} vs chance {ch[k]:.3f}", txt[k], "within 0.05", abs(txt[k] - ch[k]) <= 0.05)
    if "pair" in cfg.suites:
        img = report.row(suite="pair", guidance=g, condition="image")
        add("pair: both colours", img["both_colours"], ">= 0.85", img["both_colours"] >= 0.85)
        add("pair: both shapes", img["both_shapes"], ">= 0.70", img["both_shapes"] >= 0.70)
        add("pair: two objects drawn", img["found_two"], ">= 0.90", img["found_two"] >= 0.90)
    if "style" in cfg.suites:
        img = report.row(suite="style", guidance=g, condition="image")
        add("style: background style from a reference", img["style"], ">= 0.80", img["style"] >= 0.80)
    if "tokens" in cfg.suites:
        tr = sorted(
            (r for r in rows if r["suite"] == "tokens" and r["guidance"] == g), key=lambda r: r["tokens"]
        )
        both = [(r["colour"] + r["shape"]) / 2 for r in tr]
        add(f"tokens {[r['tokens'] for r in tr]}: mean(colour, shape)", both, "rising", tokens_rising(both))
    return out


# ------------------------------------------------------------------------------------------------ output


def _annotate(image: Image.Image, analysis: Analysis, canvas: int) -> Image.Image:
    """The generated image with the analyser's detection boxes drawn in white."""
    img = image.convert("RGB")
    draw = ImageDraw.Draw(img)
    for d in analysis.detections:
        x0, y0, x1, y1 = d.box
        sx, sy = img.width / canvas, img.height / canvas  # boxes are in analyser canvas pixels
        draw.rectangle((x0 * sx, y0 * sy, x1 * sx - 1, y1 * sy - 1), outline=(255, 255, 255))
    return img


# What the analyser saw in a sample (one line per object, or the background style) and whether that is
# what the case asked for: the contact sheets print it under the sample, green if right, red if wrong.
Note = tuple[tuple[str, ...], bool]
NOTE_LINES, NOTE_LINE_H = 2, 11


def _seen(case: Case, analysis: Analysis, score: dict[str, float]) -> Note:
    if case.suite == "style":
        return (f"{analysis.style} bg",), bool(score["style"])
    n = 1 if case.suite in ("single", "tokens") else 2
    lines = tuple(f"{d.colour} {d.shape}" for d in analysis.detections[:n]) or ("nothing drawn",)
    return lines, bool(score["both_all"] if "both_all" in score else score["both"])


def _tile(im: Image.Image, side: int) -> Image.Image:
    """Nearest-neighbour upscale, aspect kept, centred on a dark square tile."""
    tile = Image.new("RGB", (side, side), (20, 20, 20))
    scale = side / max(im.width, im.height)
    im2 = im.convert("RGB").resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST
    )
    tile.paste(im2, ((side - im2.width) // 2, (side - im2.height) // 2))
    return tile


def contact_sheet(
    rows: Sequence[Sequence[Image.Image | tuple[Image.Image, Note]]],
    headers: Sequence[str],
    labels: Sequence[str],
    side: int = 96,
) -> Image.Image:
    """A grid: one row per case, one column per header; `labels` are written at the left of each row. A
    cell given as (image, note) gets the note's lines under it, green if right and red if wrong."""
    label_w, head_h, pad = 150, 16, 2
    row_h = side + pad + NOTE_LINES * NOTE_LINE_H
    ncol = max(len(r) for r in rows) if rows else 1
    sheet = Image.new("RGB", (label_w + ncol * (side + pad), head_h + len(rows) * row_h), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for j, h in enumerate(headers):
        draw.text((label_w + j * (side + pad) + 2, 2), h, fill=(255, 255, 255))
    for i, row in enumerate(rows):
        y = head_h + i * row_h
        if i < len(labels):
            draw.text((2, y + side // 2 - 5), labels[i], fill=(255, 255, 255))
        for j, cell in enumerate(row):
            im, note = cell if isinstance(cell, tuple) else (cell, None)
            x = label_w + j * (side + pad)
            sheet.paste(_tile(im, side), (x, y))
            if note is not None:
                lines, right = note
                for k, line in enumerate(lines[:NOTE_LINES]):
                    draw.text(
                        (x + 2, y + side + k * NOTE_LINE_H),
                        line,
                        fill=(80, 220, 80) if right else (240, 80, 80),
                    )
    return sheet


def _case_label(case: Case) -> str:
    if case.style:
        return f"style: {case.style}"
    return " + ".join(f"{c} {s}" for c, s in case.objects)


def _write(
    report: EvalReport,
    out: Path,
    cases: dict[str, list[Case]],
    sheets: dict[str, list[list[tuple[Image.Image, Note]]]],
    cfg: EvalConfig,
) -> None:
    payload = {
        "config": report.config,
        "analyser": report.analyser,
        "chance": report.chance,
        "rows": report.rows,
        "targets": report.targets,
        "shape_confusion": report.shape_confusion,
    }
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "results.md").write_text(to_markdown(report))
    for key, columns in sheets.items():
        suite = "single" if key == "tokens" else key
        cs = cases[suite][: cfg.sheet_rows]
        refs = [list(c.prompt.images) for c in cs]
        if key == "tokens":
            headers = [f"ref{j + 1}" for j in range(len(refs[0]))] + [f"{t} tok" for t in cfg.tokens_sweep]
        else:
            headers = [f"ref{j + 1}" for j in range(len(refs[0]))] + ["with images", "text only"]
        rows = [r + [col[i] for col in columns] for i, r in enumerate(refs)]
        sheet = contact_sheet(rows, headers, [_case_label(c) for c in cs])
        sheet.save(out / f"sheet_{key}_g{cfg.guidance:g}.png")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def to_markdown(report: EvalReport) -> str:
    lines = ["# MUMU-mini evaluation", ""]
    cfg = report.config
    lines.append(
        f"Demo guidance {cfg['guidance']:g}, tokens per image {cfg['tokens_per_image']}, seed {cfg['seed']}; "
        f"guidance sweep {cfg['guidances']}."
    )
    acc = report.analyser.get("heldout_accuracy")
    if acc:
        lines.append(
            f"Analyser on held-out ground truth: colour {acc['colour']:.3f}, shape {acc['shape']:.3f}, "
            f"style {acc['style']:.3f} ({acc['objects']} objects)."
        )
    ref = report.analyser.get("reference_accuracy")
    if ref:
        lines.append(
            f"Analyser on this run's reference crops: colour {ref['colour']:.3f}, shape {ref['shape']:.3f}."
        )
    if report.targets:
        lines += [
            "",
            "## Targets (demo guidance)",
            "",
            "| check | value | target | pass |",
            "|---|---|---|---|",
        ]
        for t in report.targets:
            lines.append(
                f"| {t['name']} | {_fmt(t['value'])} | {t['target']} | {'yes' if t['pass'] else 'NO'} |"
            )
    for suite in SUITES + DIAGNOSTIC_SUITES:
        rows = [r for r in report.rows if r["suite"] == suite]
        if not rows:
            continue
        metrics = [k for k in rows[0] if k not in ("suite", "guidance", "condition", "tokens", "n")]
        lines += [
            "",
            f"## {suite}",
            "",
            "| guidance | condition | tokens | n | " + " | ".join(metrics) + " |",
        ]
        lines.append("|---" * (4 + len(metrics)) + "|")
        for r in rows:
            cells = [f"{r['guidance']:g}", r["condition"], str(r["tokens"]), str(r["n"])] + [
                _fmt(r[m]) for m in metrics
            ]
            lines.append("| " + " | ".join(cells) + " |")
        ch = report.chance.get("single" if suite == "tokens" else suite, {})
        lines.append("| chance | | | | " + " | ".join(_fmt(ch[m]) if m in ch else "" for m in metrics) + " |")
    key = f"single g={cfg['guidance']:g} image"
    if key in report.shape_confusion:
        lines += [
            "",
            f"## Shape confusion ({key}): rows the reference's shape, columns the generated object's",
            "",
            "| reference | " + " | ".join(SHAPES) + " | no object |",
            "|---" * (len(SHAPES) + 2) + "|",
        ]
        for shape, counts in zip(SHAPES, report.shape_confusion[key], strict=True):
            lines.append(f"| {shape} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(results: Sequence[str | Path]) -> str:
    """One table over the guidances of one or more ``results.json`` (e.g. runs split over processes):
    per guidance, the image vs text-only scores of every suite and the chance row."""
    rows: list[dict] = []
    chance: dict[str, dict[str, float]] = {}
    for r in results:
        path = Path(r)
        data = json.loads((path / "results.json" if path.is_dir() else path).read_text())
        rows += data["rows"]
        chance.update(data["chance"])

    def get(suite: str, g: float, cond: str, metric: str, tokens: int | None = None) -> str:
        for r in rows:
            if r["suite"] == suite and r["guidance"] == g and r["condition"] == cond:
                if tokens is None or r["tokens"] == tokens:
                    return f"{r[metric]:.2f}"
        return "-"

    head = (
        "| guidance | single colour (img / text) | single shape (img / text) | pair both colours (img / text) "
        "| pair both shapes (img / text) | style (img / text) |"
    )
    lines = [head, "|---" * 6 + "|"]
    for g in sorted({r["guidance"] for r in rows}):
        cells = [f"{g:g}"]
        for suite, metric in (
            ("single", "colour"),
            ("single", "shape"),
            ("pair", "both_colours"),
            ("pair", "both_shapes"),
            ("style", "style"),
        ):
            cells.append(f"{get(suite, g, 'image', metric)} / {get(suite, g, 'text_only', metric)}")
        lines.append("| " + " | ".join(cells) + " |")
    ch = [
        f"{chance.get(s, {}).get(m, float('nan')):.2f}"
        for s, m in (
            ("single", "colour"),
            ("single", "shape"),
            ("pair", "both_colours"),
            ("pair", "both_shapes"),
            ("style", "style"),
        )
    ]
    lines.append("| chance | " + " | ".join(ch) + " |")
    tok = sorted(
        {(r["guidance"], r["tokens"]) for r in rows if r["suite"] == "tokens"}, key=lambda t: (t[0], t[1])
    )
    if tok:
        lines += ["", "| guidance | tokens per image | colour | shape | both |", "|---|---|---|---|---|"]
        for g, t in tok:
            vals = [get("tokens", g, "image", m, t) for m in ("colour", "shape", "both")]
            lines.append(f"| {g:g} | {t} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini.evaluate", description=first_line(__doc__))
    ap.add_argument("--generator", help="pipeline | oracle | random | package.module:factory")
    ap.add_argument(
        "--summarise",
        nargs="+",
        type=Path,
        metavar="RESULTS",
        help="only print one table over these results.json files (or their folders)",
    )
    ap.add_argument("--vlm", help="pipeline: the mini Idefics2 folder")
    ap.add_argument("--bundle", help="pipeline: the trained bundle (.safetensors)")
    ap.add_argument("--sdxl", help="pipeline: the mini SDXL-class UNet folder (diffusers layout)")
    ap.add_argument(
        "--steps", type=int, default=None, help="pipeline: sampling steps (default: the preset's)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--generator-arg", action="append", default=[], metavar="KEY=VALUE", help="factory kwargs"
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--analyser", type=Path, default=None, help="analyser weights (default: the shipped ones)"
    )
    ap.add_argument("--n-single", type=int, default=EvalConfig.n_single)
    ap.add_argument("--n-pair", type=int, default=EvalConfig.n_pair)
    ap.add_argument("--n-style", type=int, default=EvalConfig.n_style)
    ap.add_argument("--guidance", type=float, default=None, help="demo guidance (default: the mini preset's)")
    ap.add_argument("--guidance-sweep", type=float, nargs="*", default=list(EvalConfig.guidance_sweep))
    ap.add_argument(
        "--tokens", type=int, default=None, help="demo tokens per image (default: the mini preset's)"
    )
    ap.add_argument("--tokens-sweep", type=int, nargs="*", default=list(EvalConfig.tokens_sweep))
    ap.add_argument(
        "--tokens-demo-only",
        action="store_true",
        help="run the tokens suite at the demo guidance only (not at every guidance of the sweep)",
    )
    ap.add_argument(
        "--suites",
        nargs="*",
        default=list(SUITES),
        choices=SUITES + DIAGNOSTIC_SUITES,
        help=f"default: {' '.join(SUITES)}; the Finding 2 diagnostics {' and '.join(DIAGNOSTIC_SUITES)} run "
        "only when named (n = --n-pair)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    args = ap.parse_args(argv)
    if args.summarise:
        print(summary_markdown(args.summarise), end="")
        return 0
    if not args.generator or not args.out:
        ap.error("--generator and --out are required (or --summarise)")

    kwargs = {}
    for kv in args.generator_arg:
        if "=" not in kv:
            ap.error(f"--generator-arg {kv!r}: use KEY=VALUE")
        k, _, v = kv.partition("=")
        kwargs[k] = v
    if args.generator == "pipeline":
        kwargs.update(
            {k: getattr(args, k) for k in ("vlm", "bundle", "sdxl", "steps") if getattr(args, k) is not None}
        )
        kwargs["device"] = args.device
    generate = load_generator(args.generator, **kwargs)
    cfg = EvalConfig(
        n_single=args.n_single,
        n_pair=args.n_pair,
        n_style=args.n_style,
        guidance=args.guidance,
        guidance_sweep=tuple(args.guidance_sweep),
        tokens_per_image=args.tokens,
        tokens_sweep=tuple(args.tokens_sweep),
        tokens_at_every_guidance=not args.tokens_demo_only,
        suites=tuple(args.suites),
        seed=args.seed,
        batch_size=args.batch_size,
    )
    analyser = Analyser.load(args.analyser) if args.analyser else Analyser.load()
    report = run_evaluation(generate, args.out, cfg, analyser)
    print(to_markdown(report))
    print(f"wrote {args.out}/results.json, results.md and contact sheets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
