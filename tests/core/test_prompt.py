import pytest
from PIL import Image

from mumu_core.prompt import (
    MAX_INPUT_PIXELS,
    ImageRef,
    InterleavedPrompt,
    PromptError,
    load_image,
    prepare_image,
    side_for_tokens,
)


def img(w=20, h=10, color=(255, 0, 0), mode="RGB"):
    return Image.new(mode, (w, h), color)


def test_parse_sequential_placeholders_keep_order_and_text():
    a, b = img(color=(255, 0, 0)), img(color=(0, 255, 0))
    p = InterleavedPrompt.parse("a <image> man and his <image> dog", [a, b])
    assert [type(s).__name__ for s in p.segments] == ["str", "ImageRef", "str", "ImageRef", "str"]
    assert p.images[0].image is a and p.images[1].image is b
    assert p.plain_text == "a man and his dog"
    assert p.to_text() == "a <image1> man and his <image2> dog"


def test_parse_numbered_placeholders_can_reorder():
    a, b = img(), img()
    p = InterleavedPrompt.parse("<image2> then <image1>", [a, b], tokens_per_image=[4, 9])
    assert p.images[0].image is b and p.images[0].tokens == 9
    assert p.images[1].image is a and p.images[1].tokens == 4


def test_text_only_prompt():
    p = InterleavedPrompt.parse("just words")
    assert p.images == () and p.segments == ("just words",)


def test_without_images_is_text_only_baseline():
    p = InterleavedPrompt.parse("a <image> dog", [img()])
    assert p.without_images().segments == ("a dog",)


@pytest.mark.parametrize(
    ("text", "n", "match"),
    [
        ("a <image> and <image>", 1, "2 <image> placeholders but only 1"),
        ("a <image>", 2, r"image\(s\) \[2\] are not used"),
        ("a <image3>", 2, "names image 3"),
        ("<image1> <image1>", 1, "more than once"),
        ("<image1> <image>", 2, "mixes"),
        ("", 0, "empty"),
        ("   \n", 0, "empty"),
    ],
)
def test_bad_prompts_fail_with_clear_message(text, n, match):
    with pytest.raises(PromptError, match=match):
        InterleavedPrompt.parse(text, [img() for _ in range(n)])


def test_only_placeholders_without_text_is_allowed():
    assert len(InterleavedPrompt.parse("<image>", [img()]).images) == 1


@pytest.mark.parametrize("tokens", [0, 5, 323, 5184, -4])
def test_tokens_must_be_square_and_bounded(tokens):
    with pytest.raises(PromptError, match="square number"):
        InterleavedPrompt.parse("<image>", [img()], tokens_per_image=tokens)


def test_per_image_lists_must_match_image_count():
    with pytest.raises(PromptError, match="tokens_per_image has 1 entries for 2"):
        InterleavedPrompt.parse("<image> <image>", [img(), img()], tokens_per_image=[4])


def test_zero_size_and_huge_images_rejected():
    with pytest.raises(PromptError, match="zero size"):
        ImageRef(Image.new("RGB", (0, 5)))

    class Huge(Image.Image):  # no pixel buffer: only the size matters to the check
        def __init__(self):
            super().__init__()
            self._size = (MAX_INPUT_PIXELS, 2)

    with pytest.raises(PromptError, match="downscale"):
        ImageRef(Huge())


def test_negative_weight_rejected():
    with pytest.raises(PromptError, match="weight"):
        ImageRef(img(), weight=-1)


@pytest.mark.parametrize(("tokens", "side"), [(324, 252), (1296, 504), (16, 56)])
def test_token_counts_map_to_sides(tokens, side):
    assert side_for_tokens(tokens) == side
    assert prepare_image(img(300, 100), tokens).size == (side, side)


def test_prepare_pads_black_square_and_centres():
    out = prepare_image(img(28, 14, (255, 255, 255)), tokens=4)  # 28 px side, no resize
    assert out.size == (28, 28) and out.mode == "RGB"
    assert out.getpixel((14, 1)) == (0, 0, 0)  # top band is padding
    assert out.getpixel((14, 14)) == (255, 255, 255)
    assert out.getpixel((14, 26)) == (0, 0, 0)  # bottom band is padding


def test_rgba_composites_on_black_and_mask_blanks_background():
    rgba = Image.new("RGBA", (28, 28), (255, 255, 255, 0))
    rgba.putpixel((3, 3), (10, 20, 30, 255))
    out = prepare_image(rgba, tokens=4)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 3)) == (10, 20, 30)
    mask = Image.new("L", (28, 28), 0)
    mask.paste(255, (0, 0, 14, 28))
    out = prepare_image(img(28, 28, (200, 200, 200)), tokens=4, mask=mask)
    assert out.getpixel((5, 5)) == (200, 200, 200) and out.getpixel((20, 5)) == (0, 0, 0)


def test_patch_size_is_configurable():
    assert prepare_image(img(), tokens=16, patch_size=4).size == (16, 16)


def test_load_image_errors(tmp_path):
    with pytest.raises(PromptError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(PromptError, match="cannot be read"):
        load_image(bad)
    good = tmp_path / "good.png"
    img().save(good)
    assert load_image(good).size == (20, 10)
