"""Detector post-processing (boxes -> phrases -> spans), the tiny GroundingDINO / depth models, controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import synth_image
from PIL import Image

from mumu_core.data import (
    DepthEstimator,
    GroundingDinoDetector,
    assign_boxes,
    canny,
    detector_text,
    token_phrase_map,
    xdog_sketch,
)


def test_detector_text_and_token_map(tiny_gdino):
    text, ranges = detector_text(["Red Car", "dog"])
    assert text == "red car . dog ."
    assert [text[s:e] for s, e in ranges] == ["red car", "dog"]
    det = GroundingDinoDetector.from_pretrained(tiny_gdino)
    enc = det.processor.tokenizer(text, return_offsets_mapping=True)
    toks = det.processor.tokenizer.convert_ids_to_tokens(enc["input_ids"])
    tmap = token_phrase_map(enc["offset_mapping"], ranges).tolist()
    assert list(zip(toks, tmap, strict=True)) == [
        ("[CLS]", -1),
        ("red", 0),
        ("car", 0),
        (".", -1),
        ("dog", 1),
        (".", -1),
        ("[SEP]", -1),
    ]


def test_assign_boxes_one_box_per_phrase():
    # 4 queries, tokens: [CLS] man . dog . [SEP] -> phrase map
    tmap = torch.tensor([-1, 0, -1, 1, -1, -1])
    probs = torch.zeros(4, 8)
    probs[0, 1] = 0.9  # query 0: "man" 0.9
    probs[1, 1], probs[1, 3] = 0.5, 0.6  # query 1: owned by "dog" (0.6 > 0.5)
    probs[2, 3] = 0.8  # query 2: "dog" 0.8 -> dog's best
    probs[3, 2] = 0.99  # a "." token: belongs to no phrase, never picked for its dot score
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    )
    out = assign_boxes(probs, boxes, tmap, 2, width=200, height=100)
    (man_box, man_s), (dog_box, dog_s) = out
    assert man_s == pytest.approx(0.9) and man_box == pytest.approx([80.0, 30.0, 120.0, 70.0])
    assert dog_s == pytest.approx(0.8) and dog_box == pytest.approx([0.0, 50.0, 100.0, 100.0])
    # a phrase that owns no query still gets its best (weak) box and score, for the threshold rule
    probs2 = torch.zeros(2, 8)
    probs2[:, 1] = torch.tensor([0.9, 0.8])
    probs2[:, 3] = torch.tensor([0.2, 0.1])
    out2 = assign_boxes(probs2, boxes[:2], tmap, 2, 200, 100)
    assert out2[0][1] == pytest.approx(0.9) and out2[1][1] == pytest.approx(0.2)
    # a phrase with no tokens (truncated text) gets None
    assert assign_boxes(probs, boxes, torch.tensor([-1, 0, -1, -1, -1, -1]), 2, 200, 100)[1] is None


def test_tiny_grounding_dino_batched_detection(tiny_gdino):
    det = GroundingDinoDetector.from_pretrained(tiny_gdino)
    ims = [synth_image(200, 120, 1), synth_image(90, 160, 2), synth_image(64, 64, 3)]
    res = det.detect(ims, [["man", "dog"], [], ["red car"]])
    assert len(res) == 3 and res[1] == []
    assert len(res[0]) == 2 and len(res[2]) == 1
    for im, per_image in zip(ims, res, strict=True):
        for box, score in per_image:
            assert 0.0 <= score <= 1.0
            assert len(box) == 4 and box[0] <= box[2] and box[1] <= box[3]
            # boxes are in source pixels: centre inside the image
            assert 0 <= (box[0] + box[2]) / 2 <= im.width and 0 <= (box[1] + box[3]) / 2 <= im.height


def test_detect_maps_model_output_to_phrases_and_pixels(tiny_gdino, monkeypatch):
    """Drive detect() with a known model output: the right phrase of the right image gets the box."""
    det = GroundingDinoDetector.from_pretrained(tiny_gdino)
    real_forward = det.model.forward

    def fake_forward(**kw):
        out = real_forward(**kw)
        ids = kw["input_ids"]
        logits = torch.full_like(out.logits, -10.0)
        boxes = torch.zeros_like(out.pred_boxes)
        tok = det.processor.tokenizer.convert_tokens_to_ids
        for b in range(ids.shape[0]):
            for q, (word, box) in enumerate([("dog", [0.5, 0.5, 0.5, 0.5]), ("car", [0.25, 0.25, 0.5, 0.5])]):
                hit = (ids[b] == tok(word)).nonzero()
                if len(hit):
                    logits[b, q, hit[0, 0]] = 3.0
                    boxes[b, q] = torch.tensor(box)
        out.logits, out.pred_boxes = logits, boxes
        return out

    monkeypatch.setattr(det.model, "forward", fake_forward)
    ims = [synth_image(200, 100, 1), synth_image(80, 160, 2)]
    res = det.detect(ims, [["man", "dog"], ["red car", "dog"]])
    sig3 = float(torch.sigmoid(torch.tensor(3.0)))
    (man_box, man_s), (dog_box, dog_s) = res[0]
    assert man_s < 0.01 and dog_s == pytest.approx(sig3)
    assert dog_box == pytest.approx([50.0, 25.0, 150.0, 75.0])
    (car_box, car_s), (dog2_box, dog2_s) = res[1]
    assert car_s == pytest.approx(sig3) and car_box == pytest.approx([0.0, 0.0, 40.0, 80.0])
    assert dog2_s == pytest.approx(sig3) and dog2_box == pytest.approx([20.0, 40.0, 60.0, 120.0])


def test_loaders_name_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="GroundingDINO.*config.json"):
        GroundingDinoDetector.from_pretrained(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DepthEstimator.from_pretrained(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="depth-estimation folder"):
        DepthEstimator.from_pretrained(tmp_path / "nope")


def test_depth_sizes_and_range(tiny_depth):
    depth = DepthEstimator.from_pretrained(tiny_depth)
    ims = [synth_image(200, 120, 1), synth_image(90, 160, 2), synth_image(210, 126, 4)]
    maps = depth.estimate(ims)
    for im, d in zip(ims, maps, strict=True):
        assert d.mode == "L" and d.size == im.size
        a = np.asarray(d)
        assert a.min() == 0 and a.max() == 255  # per-image min-max normalisation


def test_canny_and_sketch():
    im = Image.new("RGB", (120, 80), "white")
    im.paste((0, 0, 0), (30, 20, 90, 60))
    e = np.asarray(canny(im))
    assert e.shape == (80, 120) and set(np.unique(e)) <= {0, 255}
    assert e[20:61, 30].max() == 255 and e[40, 60] == 0 and e[5, 5] == 0  # edge on the border only
    s = np.asarray(xdog_sketch(im))
    assert s.shape == (80, 120) and s.dtype == np.uint8
    assert s[5, 5] == 0 and s[40, 60] < 30  # flat areas have no ink
    assert s[18:23, 28:92].max() > 100  # lines along the square's border
