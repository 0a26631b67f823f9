"""``python -m mumu_core``: generate writes PNGs; bad input exits 2 with one clear line."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from mumu_core.__main__ import EXIT_BAD_INPUT, main


def gen_args(
    m, out: Path, *extra: str, prompt: str = "a <image> man and his <image> dog", images=None
) -> list[str]:
    images = m.images if images is None else images
    args = ["generate", "--vlm", str(m.vlm), "--bundle", str(m.bundle), "--sdxl", str(m.sdxl)]
    args += ["--prompt", prompt, "--out", str(out), "--steps", "2"]
    for p in images:
        args += ["--image", str(p)]
    return args + list(extra)


def test_generate_writes_pngs(tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # An existing image of an earlier run must survive.
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out / "mumu-s7-0000.png")
    args = gen_args(tiny_models, out, "--seed", "7", "--batch", "2", "--cfg", "3", "--preset", "tiny")
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "mumu-s7-0001.png"), str(out / "mumu-s7-0002.png")]
    for p in printed:
        with Image.open(p) as im:
            assert im.size == (32, 32)
    assert np.asarray(Image.open(out / "mumu-s7-0000.png")).tolist()[0][0] == [1, 2, 3]
    assert sorted(f.name for f in out.iterdir()) == [
        "mumu-s7-0000.png",
        "mumu-s7-0001.png",
        "mumu-s7-0002.png",
    ]


def test_generate_single_file_rgba_and_numbered_placeholders(tiny_models, tmp_path, capsys):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (30, 20), (200, 10, 10, 128)).save(rgba)
    args = gen_args(
        tiny_models, tmp_path / "o", prompt="<image2> next to <image1>", images=[tiny_models.images[0], rgba]
    )
    args[args.index("--sdxl") + 1] = str(tiny_models.sdxl_single_file)
    assert main(args + ["--width", "48", "--tokens-per-image", "9"]) == 0
    (path,) = capsys.readouterr().out.split()
    assert Image.open(path).size == (48, 32)


def bad_input_cases(m, tmp: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    huge = tmp / "huge.png"
    Image.new("L", (9000, 8000)).save(huge)  # 72 Mpx, above the 67 Mpx limit
    broken_bundle = tmp / "broken.safetensors"
    broken_bundle.write_bytes(m.bundle.read_bytes()[:500])
    one = [m.images[0]]
    vlm = tmp / "vlm"
    shutil.copytree(m.vlm, vlm)
    (vlm / "config.json").write_text("{ not json")
    sdxl = tmp / "sdxl"
    shutil.copytree(m.sdxl, sdxl)
    (sdxl / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    return {
        "missing image": (
            gen_args(m, tmp / "o", images=[tmp / "nope.png", m.images[1]]),
            "nope.png does not exist",
        ),
        "corrupt image": (gen_args(m, tmp / "o", images=[corrupt, m.images[1]]), "cannot be read"),
        "huge image": (gen_args(m, tmp / "o", images=[huge, m.images[1]]), "above the"),
        "too many placeholders": (gen_args(m, tmp / "o", images=one), "2 <image> placeholders but only 1"),
        "unused image": (gen_args(m, tmp / "o", prompt="a <image> dog"), "not used by any placeholder"),
        "empty prompt": (gen_args(m, tmp / "o", prompt="  ", images=[]), "prompt is empty"),
        "bad tokens": (gen_args(m, tmp / "o", "--tokens-per-image", "10"), "square number"),
        "bad width": (gen_args(m, tmp / "o", "--width", "33"), "multiple of 8"),
        "missing bundle": (
            gen_args(m, tmp / "o") + ["--bundle", str(tmp / "b.safetensors")],
            "does not exist",
        ),
        "corrupt bundle": (gen_args(m, tmp / "o") + ["--bundle", str(broken_bundle)], "corrupt"),
        "missing vlm": (gen_args(m, tmp / "o") + ["--vlm", str(tmp)], "lacks config.json"),
        "missing sdxl": (gen_args(m, tmp / "o") + ["--sdxl", str(tmp / "x.safetensors")], "does not exist"),
        "wrong preset": (gen_args(m, tmp / "o", "--preset", "real"), "made for preset 'tiny'"),
        "corrupt vlm": (gen_args(m, tmp / "o") + ["--vlm", str(vlm)], "cannot load the VLM from"),
        "corrupt sdxl": (
            gen_args(m, tmp / "o") + ["--sdxl", str(sdxl)],
            "cannot load the diffusers SDXL folder",
        ),
        "vlm as sdxl": (gen_args(m, tmp / "o") + ["--sdxl", str(m.vlm)], "lacks unet/config.json"),
    }


def test_bad_input_exits_2_with_a_clear_message(tiny_models, tmp_path, capsys):
    for name, (args, message) in bad_input_cases(tiny_models, tmp_path).items():
        assert main(args) == EXIT_BAD_INPUT, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (name, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing was written by a failed run


def test_bad_input_process_exit_code(tiny_models, tmp_path):
    args = gen_args(tiny_models, tmp_path / "o", images=[tiny_models.images[0]])
    r = subprocess.run(
        [sys.executable, "-m", "mumu_core", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "placeholders but only 1" in r.stderr and "Traceback" not in r.stderr


def test_export_lora_and_fuse(tiny_models, tmp_path, capsys):
    lora = tmp_path / "lora.safetensors"
    assert main(["export-lora", "--bundle", str(tiny_models.bundle), "--out", str(lora)]) == 0
    assert all(k.startswith("lora_unet_") for k in load_file(str(lora)))
    fused = tmp_path / "fused.safetensors"
    sdxl = str(tiny_models.sdxl_single_file)
    assert main(["fuse", "--bundle", str(tiny_models.bundle), "--sdxl", sdxl, "--out", str(fused)]) == 0
    assert load_file(str(fused)).keys() == load_file(sdxl).keys()
    assert capsys.readouterr().out.split() == [str(lora), str(fused)]
    assert main(["export-lora", "--bundle", str(tmp_path / "none.safetensors"), "--out", str(lora)]) == 2


@pytest.mark.parametrize("argv", [["generate"], ["nope"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
