"""Where is an attribute lost: in the conditioning, or in the UNet that renders it?

A linear probe (multinomial logistic regression) is fitted on a trained MUMU-mini model's conditioning
of held-out single-object prompts ("a <image>shape on a background") and predicts the reference's
colour and shape from it; likewise the background style from prompts whose reference is a style patch
("a shape on a <image>background"). If the probe reads an attribute from the conditioning but the
generated images do not show it (``mumu_core.mini.evaluate``), the UNet is what fails to render it.

    python -m mumu_core.mini.probe --model mumu_core/mini/weights/model --out runs/mini/probe.json
    python -m mumu_core.mini.probe --model ... --generate 24    # + the style drawn by word vs reference

Features: the flattened context (every token, since all prompts have the same length), the pooled
vector, the frozen vision tower's tokens of the reference, and as a floor the prepared reference pixels
(a linear read-out of raw pixels cannot tell shapes apart). Probes are fitted on the first ``n_train``
cases and scored on the rest; everything is seeded, so the numbers are reproducible. Each feature's
relative spread (distance to the centroid over the norm) says how much the references move it at all.

``--generate N`` also draws N images per condition and guidance and scores their background style
with the analyser: the style named by WORD (no reference), word and reference, and reference only (the
evaluation's Finding 3 prompt). Style read by the probe but drawn only from words means the UNet side
never learned to read it from the image tokens. It also draws up to 8 object and 8 background prompts
with one seed and reports how much the images differ between references (the reference's effect).

``--paths N`` asks which path into the UNet carries the style. It draws N images for every pair of
styles (A, B) from the cross-attention context of a word-only prompt naming A and the pooled vector
(SDXL's ``text_embeds``) of one naming B, and counts how many show A and how many B; likewise for the
model's text-to-image base with its own text encoder (captions "a red circle on a flat background"),
which is what MUMU's connector replaces. The diagonal is the style drawn from words.

    python -m mumu_core.mini.probe --model mumu_core/mini/weights/model --count 300 --paths 16

``--decide N`` asks which sampling steps decide the style: N reference-only style prompts are drawn
with the reference's conditioning for the first k steps and the text-only one ("a shape on a
background", no image) after, and the reverse, for k from 0 to all steps. The steps between the k where
"reference first" stops rising and the one where "text first" starts falling are where the style is set
(a training loss that gives those noise levels little weight teaches the style little).

    python -m mumu_core.mini.probe --model mumu_core/mini/weights/model --count 300 --decide 48

``--leak N`` asks which path carries a reference onto an object it was not given to. It draws the
evaluation's first N ``pair_one_reference`` cases (two object words, a crop before the first only) with
the cross-attention context and the pooled vector each taken from the prompt with its reference or from
its text-only version, and scores each as the evaluation does: ``colour_on_both`` (the reference's colour
on both drawn objects) that stays with the context and goes with the pooled vector, or the reverse,
names the path that spreads it. Two more rows keep only the image's tokens, or only the words, of the
reference prompt's context: whether the UNet reads the reference from the image tokens wherever it
draws, or from words that absorbed the image in the encoder.

    python -m mumu_core.mini.probe --model mumu_core/mini/weights/model --count 300 --leak 60
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cli_help import first_line
from ..prompt import ImageRef, InterleavedPrompt, prepare_image
from .world import COLOURS, SHAPES, STYLES, build_caption, interleave, object_crop, scene_at, style_reference

# Far above the evaluation's indices (the demo uses 900000+), inside the held-out eval split.
PROBE_START = 500_000


@dataclass(frozen=True)
class ProbeResult:
    n_train: int
    n_test: int
    chance_colour: float
    chance_shape: float
    chance_style: float
    accuracy: dict[str, dict[str, float]]  # feature -> attribute -> held-out accuracy
    # feature -> {"objects", "backgrounds"} -> relative spread (mean distance to the centroid / mean norm)
    # over the object-prompt and background-prompt cases: how much the references move each feature
    spread: dict[str, dict[str, float]]
    # condition ("word", "word+reference", "reference") -> guidance -> style drawn; empty unless asked
    style_drawn: dict[str, dict[str, float]]
    # {"objects", "backgrounds"} -> mean absolute pixel difference (0-255) between images drawn with the
    # same seed and words from different references: how much a reference changes the image; empty unless
    # asked (``generate``)
    reference_effect: dict[str, float]
    # condition -> guidance -> confusion counts [asked style][drawn style] (STYLES order); empty unless asked
    style_confusion: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)
    # model ("mumu", "base") -> rows of style_path_swap; empty unless asked (``paths``)
    style_paths: dict[str, list[dict]] = field(default_factory=dict)
    # rows {"k", "timestep", "reference_first", "text_first"}: the style drawn with the reference for the
    # first k sampling steps then text only, and the reverse (timestep: the first step after the switch, 0
    # when k is all of them); empty unless asked
    style_steps: list[dict] = field(default_factory=list)
    # "context from reference|text + pooled from reference|text" -> the pair_one_reference scores
    # (found_two, colour, both, colour_on_both) of images drawn so; empty unless asked (``leak``)
    leak_paths: dict[str, dict[str, float]] = field(default_factory=dict)


# Fractions of the sampling steps after which ``--decide`` switches the conditioning.
DECIDE_FRACTIONS = (0.0, 0.1, 0.2, 0.35, 0.5, 1.0)


def probe_cases(count: int, tokens: int) -> tuple[list[InterleavedPrompt], np.ndarray, np.ndarray]:
    """Held-out single-object prompts in the form training produces, with colour and shape labels."""
    prompts, colours, shapes = [], [], []
    for i in range(count):
        scene = scene_at("eval", PROBE_START + i, n_objects=1)
        obj = scene.objects[0]
        prompts.append(
            InterleavedPrompt(("a ", ImageRef(object_crop(scene, 0), tokens), "shape on a background"))
        )
        colours.append(COLOURS.index(obj.colour))
        shapes.append(SHAPES.index(obj.shape))
    return prompts, np.array(colours), np.array(shapes)


def style_prompt(image, style_word: str | None, tokens: int) -> InterleavedPrompt:
    """The prompt 'a shape on a [<style>] <image>background': the reference right before "background", as
    the bootstrapped data put it; without an image, the style named by word only."""
    caption = build_caption(["shape"], f"{style_word} background" if style_word else "background")[0]
    if image is None:
        return InterleavedPrompt((caption,))
    at = len(caption) - len("background")
    return InterleavedPrompt.parse(interleave(caption, [(at, "")], sep=""), [image], tokens_per_image=tokens)


def style_probe_cases(count: int, tokens: int) -> tuple[list[InterleavedPrompt], np.ndarray]:
    """Held-out prompts whose only reference is a background-style patch; styles cycle."""
    prompts, styles = [], []
    for i in range(count):
        style = STYLES[i % len(STYLES)]
        scene = scene_at("eval", PROBE_START + i, n_objects=1, style=style, require_style_box=True)
        prompts.append(style_prompt(style_reference(scene), None, tokens))
        styles.append(STYLES.index(style))
    return prompts, np.array(styles)


def linear_probe(
    features: torch.Tensor, labels: np.ndarray, n_train: int, classes: int, seed: int = 0
) -> float:
    """Held-out accuracy of a logistic regression fitted on the first ``n_train`` rows."""
    torch.manual_seed(seed)
    x = features.double()
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = ((x - mean) / std).float()
    y = torch.as_tensor(labels)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(x[:n_train]), y[:n_train]).backward()
        opt.step()
    with torch.no_grad():
        return (lin(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item()


def relative_spread(features: torch.Tensor) -> float:
    """Mean distance of the rows to their centroid, over their mean norm: 0 when every reference gives
    the same feature. A probe can still read an attribute from a tiny spread, but a UNet trained for
    minutes on that input barely sees it."""
    x = features.double()
    return float((x - x.mean(0)).norm(dim=1).mean() / x.norm(dim=1).mean().clamp_min(1e-12))


def mean_pairwise_difference(images: Sequence) -> float:
    """Mean absolute difference (0-255) over all pairs of equally sized images."""
    x = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    n = len(x)
    if n < 2:
        raise ValueError("needs at least two images")
    diffs = [np.abs(x[i] - x[j]).mean() for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(diffs))


def drawn_styles(analyser, images: Sequence) -> np.ndarray:
    """The analysed background style of each image, as an index into STYLES."""
    return np.array([int(np.argmax(a.style_probs)) for a in analyser.analyse(list(images))])


def confusion(asked: np.ndarray, drawn: np.ndarray) -> list[list[int]]:
    """Counts [asked style][drawn style]."""
    m = np.zeros((len(STYLES), len(STYLES)), dtype=int)
    np.add.at(m, (asked, drawn), 1)
    return m.tolist()


def style_path_swap(draw: Callable[[str, str], Sequence], analyser) -> list[dict]:
    """For every (context style, pooled style) pair, ``draw(context_style, pooled_style)`` makes images
    from the context of a caption naming the first and the pooled vector of one naming the second; each
    row gives the fraction drawn in either style. Which one wins says which path the UNet reads."""
    rows = []
    for sc in STYLES:
        for sp in STYLES:
            got = drawn_styles(analyser, draw(sc, sp))
            rows.append(
                {
                    "context": sc,
                    "pooled": sp,
                    "n": len(got),
                    "drawn_context_style": float((got == STYLES.index(sc)).mean()),
                    "drawn_pooled_style": float((got == STYLES.index(sp)).mean()),
                }
            )
    return rows


def _mumu_path_draw(pipe, n: int, guidance: float) -> Callable[[str, str], Sequence]:
    from ..conditioning import SDXLConditioning

    settings = pipe.settings(guidance=guidance)
    # Word-only prompts (no image tokens), one conditioning per style drawn n times (seeds 0..n-1).
    enc = {s: pipe.encode([style_prompt(None, s, 1)]) * n for s in STYLES}

    def draw(sc: str, sp: str) -> Sequence:
        conds = [SDXLConditioning(a.context, b.pooled, a.attention_mask) for a, b in zip(enc[sc], enc[sp])]
        return pipe.draw(conds, seed=0, s=settings, progress=False)

    return draw


def _base_path_draw(t2i, n: int, guidance: float) -> Callable[[str, str], Sequence]:
    from .base_t2i import generate_from

    objects = [f"{COLOURS[i % len(COLOURS)]} {SHAPES[i % len(SHAPES)]}" for i in range(n)]
    with torch.no_grad():
        enc = {s: t2i.embed([f"a {o} on a {s} background" for o in objects]) for s in STYLES}

    def draw(sc: str, sp: str) -> Sequence:
        return list(generate_from(t2i, enc[sc][0], enc[sp][1], guidance=guidance, seed=0))

    return draw


def style_steps(pipe, prompts: Sequence[InterleavedPrompt], styles: np.ndarray, guidance: float, analyser):
    """Rows of :attr:`ProbeResult.style_steps` for reference-only style ``prompts`` (asked ``styles``)."""
    settings = pipe.settings(guidance=guidance)
    ref = pipe.encode(list(prompts))
    text = pipe.encode([style_prompt(None, None, 1)]) * len(prompts)
    pipe.pipe.scheduler.set_timesteps(settings.steps)
    timesteps = pipe.pipe.scheduler.timesteps.tolist()
    rows = []
    for k in sorted({round(f * settings.steps) for f in DECIDE_FRACTIONS}):
        row: dict = {"k": k, "timestep": int(timesteps[k]) if k < len(timesteps) else 0}
        for name, first, later in (("reference_first", ref, text), ("text_first", text, ref)):
            got = drawn_styles(
                analyser, pipe.draw(first, seed=0, s=settings, progress=False, then=(k, later))
            )
            row[name] = float((got == styles).mean())
        rows.append(row)
    return rows


def _image_block(encoder, prompt: InterleavedPrompt) -> slice:
    """Positions of a one-image prompt's image in the encoded sequence: its opening marker, its tokens and
    its closing marker (the connector's context has one row per token)."""
    ids = encoder.tokenize(prompt)
    marks = [i for i, t in enumerate(ids) if t == encoder.fake_token_id]
    return slice(marks[0], marks[-1] + 1)


def reference_leak_paths(
    pipe, n: int, guidance: float, analyser, tokens: int = 16
) -> dict[str, dict[str, float]]:
    """For the first ``n`` ``pair_one_reference`` cases of the evaluation, the cases' mean scores when the
    context and the pooled vector each come from the prompt with its reference or from its text-only
    version, and when the reference prompt's context keeps only its image's tokens or only its words
    (the other rows deleted; pooled from the text-only prompt). ``pipe``: a
    :class:`~mumu_core.pipeline.MumuPipeline`; every case keeps its seed."""
    from ..conditioning import SDXLConditioning
    from . import evaluate as E

    cases = E.pair_one_reference_cases(n, tokens)
    prompts = [c.prompt.to_interleaved() for c in cases]
    enc = {
        "reference": pipe.encode(prompts),
        "text": pipe.encode([c.prompt.without_images().to_interleaved() for c in cases]),
    }
    conditions: dict[str, list[SDXLConditioning]] = {}
    for context in enc:
        for pooled in enc:
            conditions[f"context {context} + pooled {pooled}"] = [
                SDXLConditioning(a.context, b.pooled, a.attention_mask)
                for a, b in zip(enc[context], enc[pooled], strict=True)
            ]
    image_only, words_only = [], []
    for p, a, b in zip(prompts, enc["reference"], enc["text"], strict=True):
        keep = torch.zeros(a.context.shape[1], dtype=torch.bool)
        keep[_image_block(pipe.conditioner.encoder, p)] = True
        image_only.append(SDXLConditioning(a.context[:, keep], b.pooled, a.attention_mask[:, keep]))
        words_only.append(SDXLConditioning(a.context[:, ~keep], b.pooled, a.attention_mask[:, ~keep]))
    conditions["context reference, image tokens only + pooled text"] = image_only
    conditions["context reference, words only + pooled text"] = words_only
    settings = pipe.settings(guidance=guidance)
    out: dict[str, dict[str, float]] = {}
    for name, conds in conditions.items():
        images = pipe.draw(conds, seed=0, s=settings, progress=False)
        scores = [E.score_case(c, a) for c, a in zip(cases, analyser.analyse(images), strict=True)]
        out[name] = {k: float(np.mean([x[k] for x in scores])) for k in scores[0]}
    return out


def check_probe_numbers(
    count: int, n_train: int, generate: int, paths: int, decide: int = 0, leak: int = 0
) -> None:
    """ValueError naming the first bad number; run before anything is loaded."""
    if not 0 < n_train < count:
        raise ValueError(f"n_train must be between 0 and count ({count}), got {n_train}")
    if not 0 <= generate <= count:
        raise ValueError(f"generate must be between 0 and count ({count}), got {generate}")
    if paths < 0:
        raise ValueError(f"paths must be 0 (off) or the images per style pair, got {paths}")
    if not 0 <= decide <= count:
        raise ValueError(f"decide must be between 0 and count ({count}), got {decide}")
    if leak < 0:
        raise ValueError(f"leak must be 0 (off) or the number of one-reference cases, got {leak}")


def run_probe(
    model: str | Path,
    count: int = 700,
    n_train: int = 500,
    tokens: int = 16,
    generate: int = 0,
    guidances: Sequence[float] = (1.5, 3.0),
    paths: int = 0,
    decide: int = 0,
    leak: int = 0,
) -> ProbeResult:
    from ..pipeline import MumuPipeline
    from .demo import model_paths

    check_probe_numbers(count, n_train, generate, paths, decide, leak)
    parts = model_paths(model)  # an export (vlm/, sdxl/) or the shipped bundle + bases.json
    t2i = None
    if paths:
        from .base_t2i import load_t2i

        # The base's own text encoder is the reference point; loaded before any drawing so that a base
        # folder without one fails at once (load_t2i names what is missing).
        t2i = load_t2i(parts.sdxl)
    pipe = MumuPipeline.from_paths(parts.vlm, parts.bundle, parts.sdxl)
    encoder = pipe.conditioner.encoder

    def features(prompts: Sequence[InterleavedPrompt]) -> dict[str, torch.Tensor]:
        context, pooled, vision, pixels = [], [], [], []
        with torch.no_grad():
            for p in prompts:  # one at a time, as the pipeline encodes
                c = pipe.conditioner.encode([p])
                context.append(c.context[0].flatten().float())
                pooled.append(c.pooled[0].float())
                px = encoder.pixels(p.images[0])[None].to(encoder.dtype)
                vision.append(encoder.vlm.vision_model(pixel_values=px).last_hidden_state.flatten().float())
                img = prepare_image(p.images[0].image, tokens)
                pixels.append(torch.from_numpy(np.asarray(img, dtype=np.float32).ravel() / 255))
        return {
            name: torch.stack(f)
            for name, f in (("context", context), ("pooled", pooled), ("vision", vision), ("pixels", pixels))
        }

    prompts, colours, shapes = probe_cases(count, tokens)
    style_prompts, styles = style_probe_cases(count, tokens)
    objects, backgrounds = features(prompts), features(style_prompts)
    accuracy = {
        name: {
            "colour": linear_probe(objects[name], colours, n_train, len(COLOURS)),
            "shape": linear_probe(objects[name], shapes, n_train, len(SHAPES)),
            "style": linear_probe(backgrounds[name], styles, n_train, len(STYLES)),
        }
        for name in objects
    }
    spread = {
        name: {"objects": relative_spread(objects[name]), "backgrounds": relative_spread(backgrounds[name])}
        for name in objects
    }
    drawn: dict[str, dict[str, float]] = {}
    confusions: dict[str, dict[str, list[list[int]]]] = {}
    effect: dict[str, float] = {}
    style_paths: dict[str, list[dict]] = {}
    steps_rows: list[dict] = []
    leak_paths: dict[str, dict[str, float]] = {}
    if generate or paths or decide or leak:
        from .analyser import Analyser

        analyser = Analyser.load()
    if generate:
        refs = [p.images[0].image for p in style_prompts[:generate]]
        named = [STYLES[k] for k in styles[:generate]]
        conditions = {
            "word": [style_prompt(None, s, tokens) for s in named],
            "word+reference": [style_prompt(r, s, tokens) for r, s in zip(refs, named)],
            "reference": style_prompts[:generate],
        }
        for cond, ps in conditions.items():
            for g in guidances:
                got = drawn_styles(analyser, pipe(ps, seed=0, guidance=g, progress=False))
                drawn.setdefault(cond, {})[f"{g:g}"] = float((got == styles[:generate]).mean())
                confusions.setdefault(cond, {})[f"{g:g}"] = confusion(styles[:generate], got)
        # Same words, same seed, different references: one call per prompt (each call starts at seed 0).
        k = max(2, min(generate, 8))
        for name, ps in (("objects", prompts[:k]), ("backgrounds", style_prompts[:k])):
            effect[name] = mean_pairwise_difference(
                [pipe([q], seed=0, guidance=guidances[0], progress=False)[0] for q in ps]
            )
    if paths:
        style_paths["mumu"] = style_path_swap(_mumu_path_draw(pipe, paths, guidances[0]), analyser)
        style_paths["base"] = style_path_swap(_base_path_draw(t2i, paths, guidances[0]), analyser)
    if decide:
        steps_rows = style_steps(pipe, style_prompts[:decide], styles[:decide], guidances[0], analyser)
    if leak:
        leak_paths = reference_leak_paths(pipe, leak, guidances[0], analyser, tokens)
    return ProbeResult(
        n_train,
        count - n_train,
        1 / len(COLOURS),
        1 / len(SHAPES),
        1 / len(STYLES),
        accuracy,
        spread,
        drawn,
        effect,
        confusions,
        style_paths,
        steps_rows,
        leak_paths,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mumu_core.mini.probe", description=first_line(__doc__))
    ap.add_argument("--model", type=Path, required=True, help="a model folder: vlm/, sdxl/, mumu.safetensors")
    ap.add_argument("--count", type=int, default=700)
    ap.add_argument(
        "--n-train",
        type=int,
        help="cases the probes are fitted on, the rest scored (default: 5/7 of --count)",
    )
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument(
        "--generate",
        type=int,
        default=0,
        help="also draw this many images per style condition (word / word+reference / reference) and guidance",
    )
    ap.add_argument(
        "--paths",
        type=int,
        default=0,
        help="also draw this many images per (context style, pooled style) pair, for the model and its "
        "text-to-image base: which path into the UNet carries the style",
    )
    ap.add_argument(
        "--decide",
        type=int,
        default=0,
        help="also draw this many style prompts with the reference for only the first k sampling steps "
        "(and the reverse): which steps decide the style",
    )
    ap.add_argument(
        "--leak",
        type=int,
        default=0,
        help="also draw this many of the evaluation's one-reference pair cases with the context and the "
        "pooled vector each from the prompt or its text-only version: which path spreads a reference's "
        "colour onto the other object",
    )
    ap.add_argument("--out", type=Path, help="write the result as JSON here")
    args = ap.parse_args(argv)
    n_train = args.n_train if args.n_train is not None else args.count * 5 // 7
    from .base_t2i import BaseModelError
    from .demo import MiniModelError

    try:
        check_probe_numbers(args.count, n_train, args.generate, args.paths, args.decide, args.leak)
    except ValueError as e:
        ap.error(str(e))
    try:
        result = run_probe(
            args.model,
            args.count,
            n_train,
            args.tokens,
            args.generate,
            paths=args.paths,
            decide=args.decide,
            leak=args.leak,
        )
    except (
        MiniModelError,
        BaseModelError,
    ) as e:  # a folder that is not a mini model / base: say what belongs there
        ap.error(str(e))
    print(
        f"linear probe, held-out accuracy ({result.n_test} cases; chance colour {result.chance_colour:.2f}, "
        f"shape {result.chance_shape:.2f}, style {result.chance_style:.2f})"
    )
    for name, acc in result.accuracy.items():
        sp = result.spread[name]
        print(
            f"  {name:8s} colour {acc['colour']:.2f}  shape {acc['shape']:.2f}  style {acc['style']:.2f}"
            f"   spread: objects {sp['objects']:.3f}, backgrounds {sp['backgrounds']:.3f}"
        )
    for cond, by_g in result.style_drawn.items():
        rates = ", ".join(f"{v:.2f} at guidance {g}" for g, v in by_g.items())
        print(f"  background style drawn, {cond}: {rates}")
        first = next(iter(by_g))
        rows = result.style_confusion[cond][first]
        print(
            f"    asked -> drawn at guidance {first} ({' / '.join(STYLES)}): "
            + "; ".join(f"{s} {' / '.join(map(str, r))}" for s, r in zip(STYLES, rows))
        )
    for name, rows in result.style_paths.items():
        print(f"  style drawn from the context of one style word and the pooled vector of another ({name}):")
        print("    context \\ pooled " + "".join(f"{sp:>21s}" for sp in STYLES))
        for sc in STYLES:
            cells = [r for r in rows if r["context"] == sc]
            print(
                f"    {sc:18s}"
                + "".join(
                    f"   ctx {r['drawn_context_style']:.2f} pool {r['drawn_pooled_style']:.2f}" for r in cells
                )
            )
    if result.style_steps:
        print("  style drawn with the reference for the first k sampling steps only / for all but those:")
        for r in result.style_steps:
            print(
                f"    k={r['k']:3d} (switch at timestep {r['timestep']:4d})   reference first {r['reference_first']:.2f}"
                f"   text first {r['text_first']:.2f}"
            )
    if result.leak_paths:
        print(
            "  one of two objects referenced; context and pooled vector each from the prompt or its text only:"
        )
        for name, r in result.leak_paths.items():
            print(
                f"    {name:51s} two objects {r['found_two']:.2f}  reference colour {r['colour']:.2f}"
                f"  colour+shape {r['both']:.2f}  its colour on both {r['colour_on_both']:.2f}"
            )
    for name, diff in result.reference_effect.items():
        print(
            f"  same seed and words, different {name} references: images differ by {diff:.1f}/255 per pixel"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), **asdict(result)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
