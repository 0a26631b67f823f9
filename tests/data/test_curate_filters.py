"""The model-free parts of curate: bad images of every kind, the resolution rules, the person crop, NMS."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from curate_fixtures import SMALL_RULES, bad_images, encoded
from PIL import Image

from mumu_core.data.filters import (
    BadImage,
    decode_photo,
    nms,
    person_crop_box,
    read_header,
    resolution_reason,
    resolution_scores,
)


def judge(data: bytes) -> str | None:
    """What cheap_stage does, in order: header, resolution, decode."""
    try:
        h = read_header(data, SMALL_RULES["max_pixels"])
        bad = resolution_reason(
            resolution_scores(h.width, h.height),
            SMALL_RULES["min_short_side"],
            SMALL_RULES["min_megapixels"],
            SMALL_RULES["max_aspect"],
        )
        if bad:
            return bad[0]
        decode_photo(data)
    except BadImage as e:
        return e.reason
    return None


@pytest.mark.parametrize("name", list(bad_images()))
def test_every_bad_image_kind_gets_its_reason(name):
    data, want = bad_images()[name]
    assert judge(data) == want


def test_conversions_keep_the_picture():
    items = bad_images()
    red = np.asarray(decode_photo(items["cmyk.jpg"][0]))
    assert red.shape == (240, 300, 3) and red[..., 0].mean() > 200 and red[..., 1:].mean() < 60
    grey = np.asarray(decode_photo(items["grey16.png"][0]))
    assert abs(int(grey.mean()) - round(30000 * 255 / 65535)) <= 1  # scaled, not clipped to white
    assert decode_photo(items["rotated.jpg"][0]).size == (320, 240)  # EXIF orientation applied
    assert read_header(items["png_named.jpg"][0], 10**8).format == "PNG"


def test_decompression_bomb_is_refused_from_the_header():
    bomb = encoded(Image.new("1", (14000, 13000)), "PNG")  # 182 MP: beyond PIL's own bomb limit
    with pytest.raises(BadImage) as e:
        read_header(bomb, 10**9)
    assert e.value.reason == "too_many_pixels"


def test_resolution_rules_in_order_with_scores():
    s = resolution_scores(600, 400)
    assert s == {"short_side": 400.0, "megapixels": 0.24, "aspect": 1.5}
    assert resolution_reason(s, 512, 0.0, 3.0) == ("short_side", 400.0)
    assert resolution_reason(s, 400, 0.25, 3.0) == ("megapixels", 0.24)
    assert resolution_reason(s, 400, 0.24, 1.4) == ("aspect", 1.5)
    assert resolution_reason(s, 400, 0.24, 1.5) is None  # limits are inclusive


def test_person_crop_is_the_largest_square_centred_on_the_person():
    box, inside = person_crop_box(1000, 600, [400, 100, 500, 500])
    assert box == [150, 0, 750, 600] and inside
    # Near the edge the square shifts inside the image and still contains the person.
    box, inside = person_crop_box(1000, 600, [900, 100, 990, 500])
    assert box == [400, 0, 1000, 600] and inside
    # No person: the centre crop.
    assert person_crop_box(1000, 600, None) == ([200, 0, 800, 600], False)
    # Portrait with a person taller than the square: the box's top (the head) stays in the crop.
    box, inside = person_crop_box(400, 1000, [100, 150, 300, 990])
    assert box == [0, 150, 400, 550] and not inside
    # Aspect buckets: the bucket nearest to the image's aspect, largest of that shape.
    box, _ = person_crop_box(1000, 600, [480, 100, 520, 500], aspects=(1.0, 4 / 3, 3 / 4))
    assert (box[2] - box[0], box[3] - box[1]) == (800, 600) and box[0] == 100


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float)
    assert nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.7) == [1, 2]


def test_decoded_pixels_are_exact_for_an_rgb_jpeg():
    im = Image.fromarray(np.full((120, 160, 3), (10, 200, 30), np.uint8))
    data = encoded(im, "PNG")
    assert np.array_equal(np.asarray(decode_photo(data)), np.asarray(im))
    assert Image.open(io.BytesIO(data)).format == "PNG"
