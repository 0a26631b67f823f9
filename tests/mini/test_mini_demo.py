"""The demo explains itself: ground truth per reference, marks that agree with the analyser, the sheet's
layout (references | samples | text-only) and the three-line summary. No model: images come from the
evaluation's oracle (renders of exactly what the references show) or from the references' source renders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mumu_core.mini import demo as D
from mumu_core.mini.analyser import Analyser
from mumu_core.mini.evaluate import Case, Reference, _pair_score, chance, oracle_generator
from mumu_core.mini.world import COLOURS, SHAPES


@pytest.fixture(scope="module")
def analyser() -> Analyser:
    return Analyser.load()


@pytest.fixture(scope="module")
def prompts() -> list[D.DemoPrompt]:
    return D.load_demo_prompts()


def _oracle_rows(prompts, analyser, n: int) -> list[D.SheetRow]:
    """Rows whose samples are oracle renders and whose text-only column is a fixed wrong image."""
    generate = oracle_generator()
    wrong = Image.new("RGB", (24, 24), (128, 128, 128))  # flat grey: no object, flat background
    rows = []
    for p in prompts:
        mp = p.to_mini_prompt()
        samples = list(generate([mp] * n, 1.5, 0))
        text_only = [wrong] * n
        rows.append(
            D.SheetRow(
                p,
                list(mp.images),
                samples,
                D.mark_samples(analyser, p.references, samples),
                text_only,
                D.mark_samples(analyser, p.references, text_only),
            )
        )
    return rows


def test_prompts_carry_the_ground_truth_of_their_source_scenes(prompts) -> None:
    for p in prompts:
        assert len(p.references) == len(p.images) == len(p.sources)
        for f, ref, src in zip(p.images, p.references, p.sources, strict=True):
            assert src == f.replace(".png", "_source.png")
            words = D.reference_label(ref).split()[0]
            assert words in p.note, (p.name, words, p.note)  # the note (written from the scene) agrees
    kinds = {p.kind for p in prompts}
    assert kinds == {"one object", "two objects", "style", "object + style"}


def test_source_renders_are_marked_right(prompts, analyser) -> None:
    """The oracle: each reference's own source render shows exactly what the reference shows."""
    for p in prompts:
        for ref, src in zip(p.references, p.sources, strict=True):
            img = Image.open(D.DEMO_DIR / src).convert("RGB")
            (mark,) = D.mark_samples(analyser, [ref], [img])
            assert mark.all_right, (p.name, src, mark)


def test_oracle_renders_are_marked_right_and_match_the_analyser(prompts, analyser) -> None:
    rows = _oracle_rows(prompts, analyser, n=3)
    for row in rows:
        analyses = analyser.analyse(row.samples, max_objects=2)
        for mark, a in zip(row.sample_marks, analyses, strict=True):
            assert mark.all_right, (row.prompt.name, mark)
            found = {(d.colour, d.shape) for d in a.detections}
            assert {o.found for o in mark.objects} <= found  # the words shown are the analyser's
            if mark.style is not None:
                assert mark.style.found == a.style


def test_a_wrong_image_is_marked_wrong_with_the_analysed_words(prompts, analyser) -> None:
    red_circle = next(p for p in prompts if p.name == "red_circle")
    blue_square = next(p for p in prompts if p.name == "blue_square")
    img = Image.open(D.DEMO_DIR / blue_square.sources[0]).convert("RGB")
    (mark,) = D.mark_samples(analyser, red_circle.references, [img])
    (o,) = mark.objects
    assert o.expected == ("red", "circle") and o.found == ("blue", "square")
    assert not (o.colour_ok or o.shape_ok or mark.all_right)
    (nothing,) = D.mark_samples(analyser, red_circle.references, [Image.new("RGB", (24, 24), (90, 90, 90))])
    assert nothing.objects[0].found is None and not nothing.all_right


def test_assignment_counts_agree_with_the_evaluation_pair_rule() -> None:
    rng = np.random.default_rng(0)

    def draw(k: int) -> list[tuple[str, str]]:
        return [(COLOURS[rng.integers(3)], SHAPES[rng.integers(2)]) for _ in range(k)]

    for _ in range(300):
        expected, found = draw(2), draw(int(rng.integers(0, 3)))
        picks = D.assign_objects(expected, found)
        colour = sum(p is not None and found[p][0] == e[0] for e, p in zip(expected, picks, strict=True))
        shape = sum(p is not None and found[p][1] == e[1] for e, p in zip(expected, picks, strict=True))
        ref = _pair_score(expected, found)
        assert colour == round(ref["colour"] * 2) and shape == round(ref["shape"] * 2), (expected, found)


def test_sheet_has_the_three_column_groups_and_coloured_borders(prompts, analyser) -> None:
    n = 2
    rows = _oracle_rows(prompts, analyser, n)
    lines, _ = D.summarise(rows, "sheet.png", {})
    sheet = np.asarray(D.contact_sheet(rows, lines))
    layout = D.sheet_layout(max(len(p.images) for p in prompts), n, len(prompts), lines)
    assert (sheet.shape[1], sheet.shape[0]) == layout.size
    assert D.HEADERS == ("references", "samples", "text-only")
    refs_x, samples_x, text_x = layout.group_x
    assert refs_x < samples_x < text_x
    assert samples_x >= refs_x + layout.n_refs * layout.side  # groups do not overlap
    assert text_x >= samples_x + n * layout.side
    b = layout.border
    for i, row in enumerate(rows):
        y = layout.tile_y(i)
        for k, im in enumerate(row.references):  # references at their true scale, centred on a tile
            tile = sheet[y : y + layout.side, layout.tile_x(0, k) : layout.tile_x(0, k) + layout.side]
            big = np.asarray(im.resize((im.width * layout.scale, im.height * layout.scale), Image.NEAREST))
            oy, ox = (layout.side - big.shape[0]) // 2, (layout.side - big.shape[1]) // 2
            assert np.array_equal(tile[oy : oy + big.shape[0], ox : ox + big.shape[1]], big)
        for g, images, marks in ((1, row.samples, row.sample_marks), (2, row.text_only, row.text_only_marks)):
            for k, (im, mark) in enumerate(zip(images, marks, strict=True)):
                x = layout.tile_x(g, k)
                tile = sheet[y : y + layout.side, x : x + layout.side]
                assert np.array_equal(tile, np.asarray(im.resize((layout.side,) * 2, Image.NEAREST)))
                colour = D.RIGHT if mark.all_right else D.WRONG
                assert tuple(sheet[y + layout.side // 2, x - b]) == colour  # left border
                assert tuple(sheet[y - b, x + layout.side // 2]) == colour  # top border
    # The oracle's samples are all right, the grey text-only images all wrong: both colours appear.
    assert all(m.all_right for r in rows for m in r.sample_marks)
    assert not any(m.all_right for r in rows for m in r.text_only_marks)


def test_summary_counts(prompts, analyser) -> None:
    n = 2
    rows = _oracle_rows(prompts, analyser, n)
    lines, report = D.summarise(rows, "out/contact_sheet.png", {"samples": n})
    n_obj = sum(r.kind == "object" for p in prompts for r in p.references) * n
    n_styled = sum(any(r.kind == "style" for r in p.references) for p in prompts) * n
    w, t = report["with_references"], report["text_only"]
    assert (w["colour"], w["shape"], w["objects"], w["style"], w["styled"]) == (
        n_obj,
        n_obj,
        n_obj,
        n_styled,
        n_styled,
    )
    assert (t["colour"], t["shape"]) == (0, 0)  # grey images: no object found
    assert t["styled"] == n_styled and 0 <= t["style"] <= n_styled
    assert len(lines) == 3 and "out/contact_sheet.png" in lines[0]
    assert f"colour in {n_obj}/{n_obj} objects" in lines[1]
    assert f"colour 0/{n_obj}" in lines[2] and f"colour +{n_obj}" in lines[2]
    # Chance by the evaluation's own estimate: exact for one object, its Monte Carlo for two.
    expect = {"colour": 0.0, "shape": 0.0}
    for p in prompts:
        objs = tuple((r.colour, r.shape) for r in p.references if r.kind == "object")
        if len(objs) == 1:
            expect["colour"] += n / len(COLOURS)
            expect["shape"] += n / len(SHAPES)
        elif objs:
            c = chance([Case("pair", p.to_mini_prompt(), objects=objs)], draws=2000)
            expect["colour"] += c["colour"] * len(objs) * n
            expect["shape"] += c["shape"] * len(objs) * n
    ch = report["chance"]
    assert ch["colour"] == pytest.approx(expect["colour"], rel=0.05)
    assert ch["shape"] == pytest.approx(expect["shape"], rel=0.05)
    assert ch["style"] == pytest.approx(n_styled / 3, rel=0.1)
    assert [len(p["samples"]) for p in report["prompts"]] == [n] * len(prompts)
    json.dumps(report)  # serialisable as written


def test_prompts_without_ground_truth_are_a_clear_error(tmp_path: Path) -> None:
    d = json.loads((D.DEMO_DIR / "prompts.json").read_text())
    for entry in d:
        del entry["references"]
    (tmp_path / "prompts.json").write_text(json.dumps(d))
    with pytest.raises(D.MiniModelError, match="demo-assets"):
        D.load_demo_prompts(tmp_path)
    d[0]["references"] = [{"kind": "object", "colour": "purple", "shape": "circle"}]
    (tmp_path / "prompts.json").write_text(json.dumps(d[:1]))
    with pytest.raises(D.MiniModelError, match="bad reference"):
        D.load_demo_prompts(tmp_path)


def test_reference_labels() -> None:
    assert D.reference_label(Reference("object", colour="red", shape="circle")) == "red circle"
    assert D.reference_label(Reference("style", style="textured")) == "textured background"


def test_text_only_words_are_what_without_images_keeps(prompts) -> None:
    from mumu_core.prompt import InterleavedPrompt

    for p in prompts:
        mp = p.to_mini_prompt()
        ip = InterleavedPrompt.parse(p.text, list(mp.images), tokens_per_image=16).without_images()
        assert ip.segments == (p.plain_text,)


def test_demo_rejects_zero_samples_before_loading_anything(tmp_path: Path, capsys) -> None:
    from mumu_core.mini.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "o"), "--samples", "0"])
    assert e.value.code == 2 and "--samples must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
