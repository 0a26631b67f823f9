"""Segmenting a reference by a word: GroundingDINO box -> SAM mask -> background-removed crop.

Tiny random models of the real classes (GroundingDinoForObjectDetection, SamModel): they exercise the exact
loading and inference code; their boxes are random, so thresholds decide what is "found" here.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mumu_core.data.tiny import build_tiny_grounding_dino, build_tiny_sam
from mumu_core.segment import ReferenceSegmenter, SegmentError, check_sam_folder, clean_phrase, cut_out


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory) -> ReferenceSegmenter:
    root = tmp_path_factory.mktemp("segment_models")
    det = build_tiny_grounding_dino(root / "grounding-dino")
    sam = build_tiny_sam(root / "sam")
    return ReferenceSegmenter.from_pretrained(det, sam)


def photo() -> Image.Image:
    rgb = np.zeros((80, 120, 3), np.uint8)
    rgb[:] = (40, 90, 40)
    rgb[20:60, 30:80] = (200, 120, 60)
    return Image.fromarray(rgb, "RGB")


def test_cut_out_crops_to_the_mask_and_blanks_the_background():
    img = photo()
    mask = np.zeros((80, 120), bool)
    mask[20:60, 30:80] = True
    mask[30, 30] = False
    crop, m, box = cut_out(img, mask, margin=0.1)
    assert box == (25, 15, 85, 65)  # 50 px side -> 5 px margin
    a, mm = np.asarray(crop), np.asarray(m)
    assert a.shape == (50, 60, 3) and mm.shape == (50, 60)
    assert (a[mm == 0] == 0).all() and (a[mm == 255] == (200, 120, 60)).all()
    assert mm[15, 5] == 0  # the hole at (30, 30) of the source
    with pytest.raises(SegmentError, match="empty"):
        cut_out(img, np.zeros((80, 120), bool))


def test_segment_returns_the_background_removed_reference_and_its_mask(segmenter):
    img = photo()
    s = segmenter.segment(img, "Dog.", box_threshold=0.0)
    assert s.phrase == "dog" and 0.0 <= s.score <= 1.0
    a, m = np.asarray(s.image), np.asarray(s.mask)
    assert s.image.size == s.mask.size and s.mask.mode == "L"
    assert m.any() and (a[m == 0] == 0).all()
    x0, y0, x1, y1 = s.box
    assert s.image.size == (x1 - x0, y1 - y0)
    # The kept pixels are the source's, and they lie inside the detector's box.
    src = np.asarray(img)[y0:y1, x0:x1]
    assert (a[m == 255] == src[m == 255]).all()
    dx0, dy0, dx1, dy1 = s.detector_box
    ys, xs = np.nonzero(m)
    assert xs.min() + x0 >= dx0 and xs.max() + x0 < dx1 and ys.min() + y0 >= dy0 and ys.max() + y0 < dy1
    # Deterministic.
    again = segmenter.segment(img, "dog", box_threshold=0.0)
    assert again.box == s.box and np.array_equal(np.asarray(again.mask), m)


def test_nothing_found_is_a_clear_error(segmenter, monkeypatch):
    # The random detector is sure of everything (scores ~1.0), so a weak detection is stood in at its output.
    monkeypatch.setattr(
        segmenter.detector, "detect", lambda images, phrases: [[([1.0, 2.0, 30.0, 40.0], 0.12)]]
    )
    with pytest.raises(SegmentError, match=r"no 'dog' found in the image \(best detector score 0\.12 < box"):
        segmenter.segment(photo(), "dog")
    monkeypatch.setattr(segmenter.detector, "detect", lambda images, phrases: [[None]])
    with pytest.raises(SegmentError, match="could not read the phrase"):
        segmenter.segment(photo(), "dog")
    monkeypatch.undo()
    with pytest.raises(SegmentError, match="phrase to segment is empty"):
        segmenter.segment(photo(), " . ")
    with pytest.raises(SegmentError, match="box_threshold"):
        segmenter.segment(photo(), "dog", box_threshold=2.0)


def test_missing_or_pickled_folders_name_the_path(tmp_path):
    with pytest.raises(SegmentError, match=rf"no SAM model at {tmp_path}.*facebook/sam-vit-base"):
        check_sam_folder(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SegmentError, match="pickled .bin files are not loaded"):
        check_sam_folder(tmp_path)
    with pytest.raises(SegmentError, match="no GroundingDINO model at"):
        ReferenceSegmenter.from_pretrained(tmp_path / "nope", tmp_path)
    assert clean_phrase("  Red   CAR . ") == "red car"
