"""Phrase chunker, the paper's crop rules with exact boundary numbers, and prompt building."""

from __future__ import annotations

import pytest

from mumu_core.data import (
    BootstrapConfig,
    Candidate,
    apply_rules,
    build_prompt,
    extract_phrases,
    is_person_phrase,
)
from mumu_core.data.phrases import phrases_from_strings
from mumu_core.data.rules import clip_box


def spans(caption: str) -> list[tuple[str, tuple[int, int]]]:
    return [(p.text, p.span) for p in extract_phrases(caption)]


def test_chunker_phrases_and_spans():
    assert spans("a man and his dog") == [("man", (2, 5)), ("dog", (14, 17))]
    assert spans("A red car parked on the street.") == [("red car", (2, 9)), ("street", (24, 30))]
    assert spans("a running dog on the beach") == [("running dog", (2, 13)), ("beach", (21, 26))]
    assert spans("The man's dog is sitting on a wooden bench") == [
        ("man", (4, 7)),
        ("dog", (10, 13)),
        ("wooden bench", (30, 42)),
    ]
    assert spans("the sky is blue") == [("sky", (4, 7))]  # trailing adjective is no object
    assert spans("") == []
    for cap in ("two young women playing tennis near 3 small boats", "A cup of coffee, a laptop"):
        for text, (s, e) in spans(cap):
            assert cap[s:e] == text


def test_caller_phrases_and_person_words():
    ps = phrases_from_strings("a man and his dog", ["man", "dog"])
    assert [(p.text, p.span) for p in ps] == [("man", (2, 5)), ("dog", (14, 17))]
    with pytest.raises(ValueError, match="'cat' not found"):
        phrases_from_strings("a man and his dog", ["cat"])
    assert is_person_phrase("young man") and is_person_phrase("Skier") and is_person_phrase("two women")
    assert not is_person_phrase("dog") and not is_person_phrase("man's hat") and not is_person_phrase("crowd")


def cand(phrase="dog", span=(0, 3), box=(0, 0, 200, 200), score=0.9, person=False, head=None) -> Candidate:
    return Candidate(phrase, span, box, score, phrase, person, head)


def judge(cands, w=1000, h=1000, **kw):
    return apply_rules(cands, w, h, BootstrapConfig(**kw).validate())


def test_min_side_boundary_149_vs_150():
    objs = judge(
        [
            cand(span=(0, 1), box=(0, 0, 150, 150)),
            cand(span=(2, 3), box=(300, 0, 449, 300)),  # 149 wide
            cand(span=(4, 5), box=(0, 500, 300, 649)),  # 149 high
            cand(span=(6, 7), box=(600, 600, 750.4, 750.4)),  # rounds to 150
        ]
    )
    assert [(o["kept"], o["reason"]) for o in objs] == [
        (True, None),
        (False, "too_small"),
        (False, "too_small"),
        (True, None),
    ]
    assert objs[3]["box"] == [600, 600, 750, 750]


def test_area_boundary_75_percent():
    # 1000x1000 image: 750x1000 = exactly 75 % is kept, 751x1000 is dropped.
    assert judge([cand(box=(0, 0, 750, 1000))])[0]["kept"]
    assert judge([cand(box=(0, 0, 751, 1000))])[0]["reason"] == "too_large"
    # configurable thresholds (the mini world's small canvases)
    assert judge([cand(box=(0, 0, 40, 40))], w=64, h=64, min_crop_side=32, max_crop_area_frac=0.5)[0]["kept"]
    assert judge([cand(box=(0, 0, 31, 40))], w=64, h=64, min_crop_side=32)[0]["reason"] == "too_small"


def test_threshold_and_missing_box():
    objs = judge([cand(score=0.34), cand(span=(5, 8), box=None, score=0.0), cand(span=(9, 12), score=0.35)])
    assert [o["reason"] for o in objs] == ["below_threshold", "below_threshold", None]
    assert objs[1]["box"] is None


def test_at_most_three_crops_highest_score_then_earliest_span():
    scores = [0.5, 0.9, 0.7, 0.9, 0.6]
    cands = [
        cand(span=(10 * i, 10 * i + 3), box=(200 * i, 0, 200 * i + 160, 160), score=s)
        for i, s in enumerate(scores)
    ]
    objs = judge(cands)
    assert [o["kept"] for o in objs] == [False, True, True, True, False]
    assert [o["reason"] for o in objs] == ["over_limit", None, None, None, "over_limit"]
    # tie on score 0.9 between span 10 and 30: with max_crops=1 the earlier span wins
    objs = judge(cands, max_crops=1)
    assert [o["kept"] for o in objs] == [False, True, False, False, False]


def test_duplicate_box_keeps_better_phrase():
    objs = judge([cand("man", (0, 3), (0, 0, 300, 300), 0.6), cand("person", (8, 14), (1, 1, 300, 300), 0.8)])
    assert [(o["phrase"], o["kept"], o["reason"]) for o in objs] == [
        ("man", False, "duplicate"),
        ("person", True, None),
    ]


def test_objects_sorted_by_span_and_prompt_inserts_crop_before_words():
    caption = "a man and his dog"
    objs = judge(
        [cand("dog", (14, 17), (300, 300, 600, 600)), cand("man", (2, 5), (0, 0, 200, 400), person=True)]
    )
    assert [o["phrase"] for o in objs] == ["man", "dog"]
    for i, o in enumerate(objs):
        o["crop"] = f"crop{i}.png"
    assert build_prompt(caption, objs) == [
        {"text": "a "},
        {"image": "crop0.png", "object": 0},
        {"text": "man and his "},
        {"image": "crop1.png", "object": 1},
        {"text": "dog"},
    ]
    objs[1]["kept"] = False
    assert build_prompt(caption, objs) == [
        {"text": "a "},
        {"image": "crop0.png", "object": 0},
        {"text": "man and his dog"},
    ]
    assert build_prompt("x", []) == [{"text": "x"}]


def test_clip_box_and_bad_boxes():
    assert clip_box((-5.2, 3.4, 120.6, 999), 100, 50) == (0, 3, 100, 50)
    with pytest.raises(ValueError, match="x1 >= x0"):
        clip_box((10, 0, 5, 5), 100, 100)
    with pytest.raises(ValueError, match="non-finite"):
        clip_box((0, 0, float("nan"), 5), 100, 100)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="depth_path"):
        BootstrapConfig(controls=("depth",)).validate()
    with pytest.raises(ValueError, match="unknown control"):
        BootstrapConfig(controls=("normals",)).validate()
    with pytest.raises(ValueError, match="max_crop_area_frac"):
        BootstrapConfig(max_crop_area_frac=1.5).validate()
    a, b = BootstrapConfig(), BootstrapConfig(device="cuda", batch_size=64)
    assert a.fingerprint() == b.fingerprint()  # runtime knobs do not change shards
    assert a.fingerprint() != BootstrapConfig(min_crop_side=64).fingerprint()
    assert BootstrapConfig.from_dict(a.to_dict()) == a
