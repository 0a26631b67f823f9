"""The conditioning probe separates "the conditioning lacks it" from "the UNet does not render it"."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mumu_core.mini import demo as D
from mumu_core.mini import evaluate as E
from mumu_core.mini import probe as P
from mumu_core.mini.world import COLOURS, SHAPES


def test_linear_probe_reads_a_linear_label_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    informative = torch.from_numpy(np.eye(4)[labels] + 0.1 * rng.normal(size=(400, 4))).float()
    noise = torch.from_numpy(rng.normal(size=(400, 4))).float()
    assert P.linear_probe(informative, labels, 300, 4) > 0.95
    assert P.linear_probe(noise, labels, 300, 4) < 0.45  # chance 0.25


def test_relative_spread_is_zero_for_identical_rows_and_scales_with_the_differences() -> None:
    same = torch.ones(10, 5)
    assert P.relative_spread(same) == 0.0
    rng = np.random.default_rng(0)
    base = torch.from_numpy(rng.normal(size=(1, 64)) * 10)
    small = base + torch.from_numpy(rng.normal(size=(50, 64)))
    large = base + torch.from_numpy(rng.normal(size=(50, 64)) * 5)
    assert 0 < P.relative_spread(small) < P.relative_spread(large) < 1


def test_mean_pairwise_difference() -> None:
    a, b = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), 10, np.uint8)
    assert P.mean_pairwise_difference([a, a]) == 0.0
    assert P.mean_pairwise_difference([a, b, a]) == pytest.approx(20 / 3)
    with pytest.raises(ValueError):
        P.mean_pairwise_difference([a])


def test_probe_cases_are_held_out_and_balanced_enough() -> None:
    prompts, colours, shapes = P.probe_cases(120, 16)
    assert all(p.to_text() == "a <image1>shape on a background" and p.images[0].tokens == 16 for p in prompts)
    assert set(colours) == set(range(6)) and set(shapes) == set(range(4))


def test_style_prompts_put_the_reference_before_background() -> None:
    prompts, styles = P.style_probe_cases(30, 16)
    assert all(p.to_text() == "a shape on a <image1>background" for p in prompts)
    assert sorted(set(styles)) == [0, 1, 2] and np.bincount(styles).tolist() == [10, 10, 10]
    word = P.style_prompt(None, "textured", 16)
    assert word.to_text() == "a shape on a textured background" and not word.images
    both = P.style_prompt(prompts[0].images[0].image, "flat", 16)
    assert both.to_text() == "a shape on a flat <image1>background"


def test_confusion_counts_asked_against_drawn() -> None:
    m = P.confusion(np.array([0, 0, 1, 2, 2]), np.array([0, 2, 1, 0, 0]))
    assert m == [[1, 0, 1], [0, 1, 0], [2, 0, 0]]


class _StyleOf:
    """A stand-in analyser: each 'image' is the index of the style it shows."""

    def analyse(self, images):
        return [type("A", (), {"style_probs": np.eye(3)[i]})() for i in images]


def test_style_path_swap_says_which_path_the_renderer_follows() -> None:
    from mumu_core.mini.world import STYLES

    # A renderer that draws whatever the pooled vector says (the MUMU model does so for texture).
    rows = P.style_path_swap(lambda sc, sp: [STYLES.index(sp)] * 4, _StyleOf())
    assert len(rows) == 9 and all(r["n"] == 4 and r["drawn_pooled_style"] == 1.0 for r in rows)
    assert [r["drawn_context_style"] for r in rows] == [
        1.0 if r["context"] == r["pooled"] else 0.0 for r in rows
    ]
    # One that follows the context for half its images and the pooled vector for the other half.
    rows = P.style_path_swap(lambda sc, sp: [STYLES.index(sc)] * 2 + [STYLES.index(sp)] * 2, _StyleOf())
    off = [r for r in rows if r["context"] != r["pooled"]]
    assert all(r["drawn_context_style"] == 0.5 and r["drawn_pooled_style"] == 0.5 for r in off)


class _DecidedAtStep:
    """A stand-in pipeline whose image takes its style from the conditioning active at sampling step 5 of
    20: a reference's style, or the wrong one for the text-only prompt."""

    steps = 20

    def __init__(self, styles: np.ndarray) -> None:
        self.styles = styles
        self.pipe = type("Pipe", (), {"scheduler": self})()

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.arange(999, 0, -1000 // n)[:n]

    def settings(self, guidance: float) -> object:
        return type("S", (), {"steps": self.steps, "guidance": guidance})()

    def encode(self, prompts: list) -> list:
        return [p if isinstance(p, int) else "text" for p in prompts]

    def draw(self, first: list, seed: int, s: object, progress: bool, then: tuple) -> list[int]:
        k, later = then
        active = first if k > 5 else later
        return [
            int(self.styles[i]) if c != "text" else (int(self.styles[i]) + 1) % 3
            for i, c in enumerate(active)
        ]


def test_style_steps_finds_the_step_that_decides_the_style() -> None:
    styles = np.array([0, 1, 2, 0])
    rows = P.style_steps(_DecidedAtStep(styles), [0, 1, 2, 3], styles, 1.5, _StyleOf())
    assert [r["k"] for r in rows] == [0, 2, 4, 7, 10, 20]
    assert [r["reference_first"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert [r["text_first"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert rows[0]["timestep"] == 999 and rows[-1]["timestep"] == 0


class _FakeTokens:
    """Token ids of a prompt: a word, then (with an image) marker 9, two image tokens, marker 9, a word."""

    fake_token_id = 9

    def tokenize(self, prompt) -> list[int]:
        return [0, 9, 1, 1, 9, 0] if prompt.images else [0, 0]


class _LeakThroughImageTokens:
    """A fake pipeline whose UNet reads a reference from its image tokens wherever it draws: the context
    is 1 at the image's rows and 0 at the words; images drawn from a context with any 1 show the
    reference's colour on both objects, others two colours (the analyser below reads them from the cases)."""

    def __init__(self) -> None:
        self.conditioner = SimpleNamespace(encoder=_FakeTokens())

    def encode(self, prompts: list) -> list:
        from mumu_core.conditioning import SDXLConditioning

        out = []
        for p in prompts:
            ids = self.conditioner.encoder.tokenize(p)
            context = torch.tensor([float(t != 0) for t in ids]).reshape(1, -1, 1)
            out.append(
                SDXLConditioning(context, torch.zeros(1, 1), torch.ones(1, len(ids), dtype=torch.bool))
            )
        return out

    def settings(self, guidance: float) -> float:
        return guidance

    def draw(self, conds: list, seed: int, s: float, progress: bool) -> list[bool]:
        return [bool(c.context.numel() and c.context.max() > 0) for c in conds]


class _LeakAnalyser:
    def analyse(self, images: list[bool]) -> list:
        from mumu_core.mini.analyser import Analysis, Detection

        out = []
        for i, leaked in enumerate(images):
            cases = E.pair_one_reference_cases(len(images), 16)
            colour = cases[i].objects[0][0]
            other = colour if leaked else next(c for c in COLOURS if c != colour)
            dets = tuple(
                Detection(None, 10, np.eye(len(COLOURS))[COLOURS.index(c)], np.eye(len(SHAPES))[0])
                for c in (colour, other)
            )
            out.append(Analysis(dets, np.ones(3) / 3))
        return out


def test_reference_leak_paths_names_the_path_that_spreads_a_reference() -> None:
    rows = P.reference_leak_paths(_LeakThroughImageTokens(), 4, 1.5, _LeakAnalyser())
    swaps = {f"context {c} + pooled {p}" for c in ("reference", "text") for p in ("reference", "text")}
    parts = {f"context reference, {k} only + pooled text" for k in ("image tokens", "words")}
    assert set(rows) == swaps | parts
    for name, r in rows.items():
        assert r["found_two"] == 1.0 and r["colour"] == 1.0
        leaks = name.startswith("context reference") and "words only" not in name
        assert r["colour_on_both"] == float(leaks), (name, r)
    with pytest.raises(ValueError, match="leak"):
        P.check_probe_numbers(10, 5, 0, 0, 0, leak=-1)


@pytest.mark.slow
def test_shipped_model_conditioning_carries_colour_shape_and_style(tmp_path, one_thread) -> None:
    result = P.run_probe(D.MODEL_DIR, count=300, n_train=200)
    ctx, pixels = result.accuracy["context"], result.accuracy["pixels"]
    assert ctx["colour"] >= 0.9 and ctx["shape"] >= 0.7, result
    # Raw pixels are the floor: shape and style are not linear in them, so the encoder did the work.
    assert ctx["shape"] >= pixels["shape"] + 0.3, result
    assert ctx["style"] >= 0.55 and ctx["style"] >= pixels["style"] + 0.2, result
    assert not result.style_drawn
    assert set(result.spread) == set(result.accuracy)
    assert all(0 < v["objects"] < 2 and 0 < v["backgrounds"] < 2 for v in result.spread.values()), result
    out = tmp_path / "probe.json"
    args = [
        "--model",
        str(D.MODEL_DIR),
        "--count",
        "60",
        "--n-train",
        "40",
        "--generate",
        "3",
        "--paths",
        "1",
        "--decide",
        "3",
        "--leak",
        "2",
        "--out",
        str(out),
    ]
    assert P.main(args) == 0
    written = json.loads(out.read_text())
    assert written["n_test"] == 20
    drawn = written["style_drawn"]
    assert set(drawn) == {"word", "word+reference", "reference"}
    assert all(
        set(v) == {"1.5", "3"} and all(r in (0, 1 / 3, 2 / 3, 1) for r in v.values()) for v in drawn.values()
    )
    confusions = written["style_confusion"]
    assert set(confusions) == set(drawn)
    for cond, by_g in confusions.items():
        for g, m in by_g.items():
            # three prompts, one per style; the diagonal is what was drawn right
            assert [sum(r) for r in m] == [1, 1, 1] and sum(m[i][i] for i in range(3)) == 3 * drawn[cond][g]
    paths = written["style_paths"]
    assert set(paths) == {"mumu", "base"} and all(len(rows) == 9 for rows in paths.values())
    # The base draws the style its caption names (check: style 0.97) when context and pooled agree.
    agree = [r for r in paths["base"] if r["context"] == r["pooled"]]
    assert sum(r["drawn_context_style"] for r in agree) >= 2, agree
    steps = written["style_steps"]
    assert [r["k"] for r in steps] == [0, 2, 4, 7, 10, 20]
    # k = 0 and k = all steps are the plain draws: reference first for no step is text only throughout.
    assert steps[0]["reference_first"] == steps[-1]["text_first"]
    assert steps[0]["text_first"] == steps[-1]["reference_first"]
    leak = written["leak_paths"]
    assert len(leak) == 6 and all(
        set(r) == {"found_two", "colour", "both", "colour_on_both"} for r in leak.values()
    )
    # The reference's colour is drawn only where the context has the reference (colour 1.00 in evaluation).
    assert (
        leak["context reference + pooled reference"]["colour"] >= leak["context text + pooled text"]["colour"]
    )
    effect = written["reference_effect"]
    assert set(effect) == {"objects", "backgrounds"} and all(0 <= v <= 255 for v in effect.values())
    # Object references change what is drawn (colour 1.00 in the evaluation).
    assert effect["objects"] > 3, effect
    with pytest.raises(ValueError, match="generate"):
        P.run_probe(D.MODEL_DIR, count=10, n_train=5, generate=11)
    with pytest.raises(ValueError, match="n_train"):
        P.run_probe(D.MODEL_DIR, count=10, n_train=10)
