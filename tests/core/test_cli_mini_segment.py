"""``python -m mumu_core generate --mini`` (the embedded model on a user's picture) and ``--segment PHRASE``
(GroundingDINO + SAM on the --image before it), with tiny random detector/SAM for the latter."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from mumu_core.__main__ import EXIT_BAD_INPUT, main
from mumu_core.data.tiny import build_tiny_grounding_dino, build_tiny_sam


def my_picture(path: Path, colour=(220, 30, 30)) -> Path:
    """A user's photo of a coloured disc: larger than the mini world, not a crop of it."""
    im = Image.new("RGB", (120, 90), (90, 90, 90))
    ImageDraw.Draw(im).ellipse((30, 15, 90, 75), fill=colour)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def segmenter_folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli_segment")
    return build_tiny_grounding_dino(root / "grounding-dino"), build_tiny_sam(root / "sam")


def test_generate_mini_runs_the_embedded_model_on_my_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default --out is outputs/mini under the working folder
    img = my_picture(tmp_path / "my.png")
    argv = ["generate", "--mini", "--prompt", "a <image> shape on a background", "--image", str(img)]
    assert main([*argv, "--steps", "4", "--batch", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).parent for p in printed] == [Path("outputs/mini")] * 2
    for p in printed:
        with Image.open(tmp_path / p) as im:
            assert im.size == (24, 24) and im.mode == "RGB"


def test_generate_mini_refuses_model_paths_and_plain_generate_needs_them(tmp_path, capsys):
    img = my_picture(tmp_path / "my.png")
    argv = ["generate", "--prompt", "a <image> shape", "--image", str(img)]
    assert main([*argv, "--mini", "--vlm", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "--mini uses the embedded model: drop --vlm" in capsys.readouterr().err
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: missing --vlm --bundle --sdxl --out") and "--mini" in err


def test_segment_applies_to_the_image_before_it(tmp_path, capsys, segmenter_folders, monkeypatch):
    det, sam = segmenter_folders
    a, b = my_picture(tmp_path / "a.png"), my_picture(tmp_path / "b.png", (30, 30, 220))
    seen = {}
    import mumu_core.prompt as prompt_mod

    parse = prompt_mod.InterleavedPrompt.parse

    def spy(text, images=(), *args, masks=None, **kw):
        seen["sizes"] = [im.size for im in images]
        seen["masks"] = [m is not None for m in (masks or [None] * len(images))]
        return parse(text, images, *args, masks=masks, **kw)

    monkeypatch.setattr(prompt_mod.InterleavedPrompt, "parse", staticmethod(spy))
    argv = ["generate", "--mini", "--prompt", "a <image> and a <image> on a background", "--steps", "2"]
    argv += [
        "--image",
        str(a),
        "--image",
        str(b),
        "--segment",
        "ball",
        "--detector",
        str(det),
        "--sam",
        str(sam),
    ]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    captured = capsys.readouterr()
    assert "segmented 'ball' in" in captured.err and str(b) in captured.err
    assert seen["masks"] == [False, True]  # only the second image was segmented
    assert seen["sizes"][0] == (120, 90) and seen["sizes"][1] != (120, 90)


def test_segment_errors(tmp_path, capsys, segmenter_folders):
    det, sam = segmenter_folders
    img = my_picture(tmp_path / "a.png")
    base = ["generate", "--mini", "--prompt", "a <image> shape", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*base, "--segment", "ball", "--image", str(img)])
    assert e.value.code == 2 and "give --image first" in capsys.readouterr().err
    assert main([*base, "--image", str(img), "--segment", "ball"]) == EXIT_BAD_INPUT
    assert "--segment needs --detector" in capsys.readouterr().err
    assert (
        main(
            [*base, "--image", str(img), "--segment", "ball", "--detector", str(det), "--sam", str(tmp_path)]
        )
        == 2
    )
    assert f"no SAM model at {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written on bad input
