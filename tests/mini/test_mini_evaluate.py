"""The evaluation harness scores an oracle ~1, generators that ignore references ~chance, and finds trends."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_core.mini import evaluate as E
from mumu_core.mini import world as W
from mumu_core.mini.analyser import Analyser

SMALL = E.EvalConfig(
    n_single=48,
    n_pair=24,
    n_style=24,
    guidance=1.5,
    tokens_per_image=16,
    guidance_sweep=(1.0,),
    batch_size=24,
)


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    torch.set_num_threads(1)
    return Analyser.load()


def test_oracle_scores_one(analyser: Analyser, tmp_path) -> None:
    report = E.run_evaluation(E.oracle_generator(), tmp_path, SMALL, analyser)
    for g in (1.0, 1.5):
        single = report.row(suite="single", guidance=g, condition="image")
        assert single["colour"] >= 0.98 and single["shape"] >= 0.98
        pair = report.row(suite="pair", guidance=g, condition="image")
        assert pair["both_colours"] >= 0.95 and pair["both_shapes"] >= 0.95
        assert report.row(suite="style", guidance=g, condition="image")["style"] >= 0.9
    passed = {t["name"].split(":")[0]: t["pass"] for t in report.targets}
    assert passed["single"] and passed["pair"]
    # The oracle ignores tokens, so fidelity does not rise with them.
    assert not [t for t in report.targets if t["name"].startswith("tokens")][0]["pass"]
    # Outputs: tables, json and contact sheets.
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["rows"] and data["targets"] and data["chance"]["single"]["colour"] == pytest.approx(1 / 6)
    assert "| single: colour |" in (tmp_path / "results.md").read_text()
    # The oracle renders the reference's shape: its confusion matrix is diagonal.
    conf = np.array(data["shape_confusion"]["single g=1.5 image"])
    assert conf.sum() == SMALL.n_single and np.trace(conf) >= 0.98 * SMALL.n_single
    assert "## Shape confusion (single g=1.5 image)" in (tmp_path / "results.md").read_text()
    for suite in ("single", "pair", "style", "tokens"):
        sheet = Image.open(tmp_path / f"sheet_{suite}_g1.5.png")
        assert sheet.width > 200 and sheet.height > 200


def test_references_ignored_gives_chance(analyser: Analyser, tmp_path) -> None:
    cfg = E.EvalConfig(
        n_single=240,
        n_pair=120,
        n_style=120,
        guidance=1.5,
        tokens_per_image=16,
        guidance_sweep=(),
        suites=("single", "pair", "style"),
        batch_size=120,
    )
    report = E.run_evaluation(E.random_generator(), tmp_path, cfg, analyser)
    ch = report.chance
    single = report.row(suite="single", guidance=1.5, condition="image")
    assert abs(single["colour"] - ch["single"]["colour"]) < 0.07
    assert abs(single["shape"] - ch["single"]["shape"]) < 0.08
    pair = report.row(suite="pair", guidance=1.5, condition="image")
    assert abs(pair["both_colours"] - ch["pair"]["both_colours"]) < 0.06
    assert abs(report.row(suite="style", guidance=1.5, condition="image")["style"] - 1 / 3) < 0.1
    # A random renderer still draws two objects; every check of following the references fails.
    follows = [t for t in report.targets if not t["name"].startswith(("text-only", "pair: two objects"))]
    assert follows and not any(t["pass"] for t in follows)


def constant_generator(prompts: Sequence[E.MiniPrompt], guidance: float, seed: int) -> list[Image.Image]:
    """Always a red circle (and a blue square) on a flat background, whatever the prompt says."""
    out = []
    for i, p in enumerate(prompts):
        colours, shapes = ["red", "blue"][: p.n_objects], ["circle", "square"][: p.n_objects]
        s = W.generate_scene(np.random.default_rng([seed, i]), colours=colours, shapes=shapes, style="flat")
        out.append(W.render(s))
    return out


def test_balanced_cases_make_a_constant_generator_score_exactly_chance(analyser: Analyser, tmp_path) -> None:
    cfg = E.EvalConfig(n_single=48, guidance=1.5, tokens_per_image=16, guidance_sweep=(), suites=("single",))
    report = E.run_evaluation(constant_generator, tmp_path, cfg, analyser)
    for cond in ("image", "text_only"):
        row = report.row(suite="single", condition=cond)
        assert row["colour"] == pytest.approx(1 / 6) and row["shape"] == pytest.approx(1 / 4)
        # Always a circle, whatever the reference: one full column, 12 cases per reference shape.
        conf = np.array(report.shape_confusion[f"single g=1.5 {cond}"])
        assert conf[:, W.SHAPES.index("circle")].tolist() == [12, 12, 12, 12] and conf.sum() == 48
    assert all(t["pass"] for t in report.targets if t["name"].startswith("text-only"))


def token_limited_generator(prompts: Sequence[E.MiniPrompt], guidance: float, seed: int) -> list[Image.Image]:
    """Copies the references' attributes with probability tokens / 16, else draws them at random."""
    oracle, rand = E.oracle_generator(), E.random_generator()
    out = []
    for i, p in enumerate(prompts):
        use = np.random.default_rng([seed, i, 7]).random() < p.tokens_per_image / 16
        out.extend((oracle if use else rand)([p], guidance, seed * 1000 + i))
    return out


def test_tokens_suite_detects_rising_fidelity(analyser: Analyser, tmp_path) -> None:
    cfg = E.EvalConfig(
        n_single=96,
        guidance=1.5,
        tokens_per_image=16,
        guidance_sweep=(),
        suites=("tokens",),
        tokens_sweep=(1, 4, 16),
    )
    report = E.run_evaluation(token_limited_generator, tmp_path, cfg, analyser)
    (target,) = report.targets
    assert target["pass"], target
    assert target["value"][0] < 0.5 < target["value"][-1]


def test_pair_scoring_rules() -> None:
    exp = (("red", "circle"), ("blue", "square"))
    assert E._pair_score(exp, [("blue", "square"), ("red", "circle")])["both_all"] == 1.0
    mixed = E._pair_score(exp, [("red", "square"), ("blue", "circle")])
    assert mixed["both_colours"] == 1.0 and mixed["both_shapes"] == 0.0
    one = E._pair_score(exp, [("red", "circle")])
    assert one["both_colours"] == 0.0 and one["colour"] == 0.5
    assert E.tokens_rising([0.2, 0.5, 0.9]) and not E.tokens_rising([0.5, 0.2, 0.6])
    assert not E.tokens_rising([0.5, 0.5])


def test_finding2_diagnostics_run_only_when_named_and_score_oracle_one_random_chance(
    analyser: Analyser, tmp_path
) -> None:
    # Not in the default run (the targets' suites only).
    assert not set(E.DIAGNOSTIC_SUITES) & set(E.EvalConfig().suites)
    pairs = E.pair_cases(24, 16)
    same = E.pair_same_image_cases(24, 16)
    one = E.pair_one_reference_cases(24, 16)
    for p, s, o in zip(pairs, same, one, strict=True):
        # The same colour and shape pairs as the pair suite; one-reference keeps its first crop only.
        assert s.objects == p.objects and o.objects == p.objects[:1]
        assert s.prompt.text.count("<image>") == 2 and o.prompt.text.count("<image>") == 1
        assert o.prompt.n_objects == 2 and np.array_equal(o.prompt.images[0], p.prompt.images[0])
        first, second = o.prompt.text.split(" and ")
        assert "<image>" in first and "<image>" not in second  # the crop before the first word only
    # Same-image crops come from one two-object scene: smaller than the single-object scenes' crops.
    assert np.mean([im.width for c in same for im in c.prompt.images]) < np.mean(
        [im.width for c in pairs for im in c.prompt.images]
    )
    cfg = E.EvalConfig(
        n_pair=24,
        guidance=1.5,
        tokens_per_image=16,
        guidance_sweep=(),
        suites=E.DIAGNOSTIC_SUITES,
        batch_size=24,
    )
    report = E.run_evaluation(E.oracle_generator(), tmp_path / "oracle", cfg, analyser)
    assert report.row(suite="pair_same_image", condition="image")["both_shapes"] >= 0.95
    row = report.row(suite="pair_one_reference", condition="image")
    assert row["both"] >= 0.95 and row["found_two"] >= 0.9
    assert not report.targets  # diagnostics, not targets
    md = (tmp_path / "oracle" / "results.md").read_text()
    assert "## pair_same_image" in md and "## pair_one_reference" in md
    assert (tmp_path / "oracle" / "sheet_pair_one_reference_g1.5.png").is_file()
    # Chance: a renderer drawing two random objects, one of which may be the referenced one.
    ch = report.chance["pair_one_reference"]
    assert ch["colour"] == pytest.approx(1 - (5 / 6) ** 2, abs=0.02)
    assert ch["both"] == pytest.approx(1 - (23 / 24) ** 2, abs=0.02)
    assert ch["colour_on_both"] == pytest.approx(1 / 36, abs=0.01)
    assert E._one_reference_score(("red", "circle"), [("blue", "square"), ("red", "circle")]) == {
        "colour": 1.0,
        "both": 1.0,
        "colour_on_both": 0.0,
    }
    leaked = E._one_reference_score(("red", "circle"), [("red", "square"), ("red", "circle")])
    assert leaked == {"colour": 1.0, "both": 1.0, "colour_on_both": 1.0}
    alone = E._one_reference_score(("red", "circle"), [("red", "square")])
    assert alone == {"colour": 1.0, "both": 0.0, "colour_on_both": 0.0}
    with pytest.raises(ValueError, match="unknown suite"):
        E.EvalConfig(suites=("pairs",)).resolved()


def test_prompts_are_valid_interleaved_prompts() -> None:
    prompt_mod = pytest.importorskip("mumu_core.prompt")
    (case,) = E.pair_cases(1, tokens=16)
    ip = case.prompt.to_interleaved()
    assert isinstance(ip, prompt_mod.InterleavedPrompt)
    assert len(ip.images) == 2 and all(r.tokens == 16 for r in ip.images)
    # Each placeholder sits right before its word, as training's data rules place crops, so the
    # evaluation's text segments are the training prompts' (no extra space token after an image).
    assert case.prompt.text.startswith("a <image>") and " and a" in case.prompt.text
    after_image = [ip.segments[i + 1] for i, s in enumerate(ip.segments[:-1]) if not isinstance(s, str)]
    assert after_image and all(isinstance(t, str) and not t.startswith(" ") for t in after_image)
    text_only = case.prompt.without_images()
    assert "<image>" not in text_only.text and not text_only.images and not text_only.references
    assert "  " not in text_only.text and text_only.text.startswith("a ")
    (style,) = E.style_cases(1, tokens=4)
    assert "<image>background" in style.prompt.text


def test_harness_rejects_bad_generators(analyser: Analyser, tmp_path) -> None:
    cfg = E.EvalConfig(n_single=4, guidance=1.5, tokens_per_image=16, guidance_sweep=(), suites=("single",))
    with pytest.raises(RuntimeError, match="returned 1 images for 4"):
        E.run_evaluation(lambda p, g, s: [Image.new("RGB", (24, 24))], tmp_path, cfg, analyser)
    with pytest.raises(ValueError, match="unknown suite"):
        E.run_evaluation(E.oracle_generator(), tmp_path, E.EvalConfig(suites=("nope",)), analyser)
    with pytest.raises(ValueError, match="oracle"):
        E.load_generator("nonsense")


def test_pipeline_generator_runs_the_harness_on_a_random_mini_model(
    analyser: Analyser, tmp_path_factory
) -> None:
    """The real model path end to end (random weights, 2 steps): valid images, every suite reported."""
    pytest.importorskip("mumu_core.pipeline")
    from mumu_core.testing import build_tiny_models

    models = build_tiny_models(tmp_path_factory.mktemp("mini_models"), "mini")
    generate = E.load_generator("pipeline", vlm=models.vlm, bundle=models.bundle, sdxl=models.sdxl, steps=2)
    cfg = E.EvalConfig(
        n_single=6,
        n_pair=3,
        n_style=3,
        guidance_sweep=(1.0,),
        tokens_sweep=(1, 16),
        batch_size=6,
        sheet_rows=3,
    )
    out = tmp_path_factory.mktemp("eval")
    report = E.run_evaluation(generate, out, cfg, analyser)
    assert report.config["guidance"] == 1.5 and report.config["tokens_per_image"] == 16  # the mini preset's
    suites = {(r["suite"], r["guidance"], r["condition"]) for r in report.rows}
    assert len(suites) == 2 * (3 * 2 + 1)
    assert (out / "results.md").is_file() and (out / "sheet_pair_g1.5.png").is_file()
    with pytest.raises(ValueError, match="--vlm, --bundle, --sdxl"):
        E.load_generator("pipeline", vlm=models.vlm)


def test_contact_sheet_notes_say_what_was_seen_green_when_right_red_when_wrong() -> None:
    im = Image.new("RGB", (24, 24), (128, 128, 128))
    cells = [im, (im, (("red cross",), True)), (im, (("blue circle", "green square"), False))]
    sheet = np.asarray(E.contact_sheet([cells], ["ref1", "with images", "text only"], ["case"]), dtype=int)

    def note_strip(column: int) -> np.ndarray:  # under the tile: header 16 px, tile 96 px, cells 98 px apart
        x = 150 + column * 98
        return sheet[16 + 96 : 16 + 96 + E.NOTE_LINES * E.NOTE_LINE_H, x : x + 96]

    right, wrong = note_strip(1), note_strip(2)
    assert (right[..., 1] - right[..., 0] > 60).sum() > 20 and not (right[..., 0] - right[..., 1] > 60).any()
    assert (wrong[..., 0] - wrong[..., 1] > 60).sum() > 20 and not (wrong[..., 1] - wrong[..., 0] > 60).any()
    # two lines for two objects: the second line has text too
    assert (wrong[E.NOTE_LINE_H :, :, 0] > 100).any()
    assert note_strip(0).max() == 0  # a reference gets no note
