"""``python -m mumu_core`` against bad input, run as a user would (subprocesses), plus the image-mode
matrix of ``prompt.prepare_image`` (docs/ERRORS.md)."""

from __future__ import annotations

import hashlib
import io
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from robust_helpers import assert_clean_error, run_cmd


def gen(m, out: Path, *extra: str, prompt: str = "a <image> man and his <image> dog", vlm=None, bundle=None):
    return [
        "-m", "mumu_core", "generate", "--vlm", str(vlm or m.vlm), "--bundle", str(bundle or m.bundle),
        "--sdxl", str(m.sdxl_single_file), "--prompt", prompt, "--image", str(m.images[0]),
        "--image", str(m.images[1]), "--out", str(out), "--steps", "2", *extra,
    ]  # fmt: skip


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_unwritable_output_is_found_before_any_work(tiny_models, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    res = run_cmd(gen(tiny_models, a_file / "out"))
    assert_clean_error(res, "a_file is a file, not a folder")
    assert a_file.read_text() == "keep me"


def test_export_lora_and_fuse_refuse_to_overwrite_their_input(tiny_models, tmp_path):
    bundle = tmp_path / "bundle.safetensors"
    shutil.copy(tiny_models.bundle, bundle)
    before = sha(bundle)
    res = run_cmd(["-m", "mumu_core", "export-lora", "--bundle", str(bundle), "--out", str(bundle)])
    assert_clean_error(res, "is the input", "refusing to overwrite")
    res = run_cmd(
        ["-m", "mumu_core", "fuse", "--bundle", str(bundle), "--sdxl", str(tiny_models.sdxl_single_file),
         "--out", str(bundle)]
    )  # fmt: skip
    assert_clean_error(res, "is the input", "refusing to overwrite")
    assert sha(bundle) == before


def test_written_files_respect_the_umask(tiny_models, tmp_path):
    out = tmp_path / "lora.safetensors"
    res = run_cmd(
        ["-m", "mumu_core", "export-lora", "--bundle", str(tiny_models.bundle), "--out", str(out)],
        umask=0o002,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o664  # not mkstemp's / safetensors' private 0600


def test_non_finite_generation_is_an_error_naming_the_cause(tiny_models, tmp_path):
    out = tmp_path / "out"
    res = run_cmd(gen(tiny_models, out, "--lora-scale", "1e30"))
    assert_clean_error(res, "NaN/inf pixels", "LoRA scale 1e+30", "Nothing was written")
    assert not out.exists() or not any(out.iterdir())

    # A bundle that holds NaN is refused before anything loads.
    from safetensors.torch import load_file, save_file

    from mumu_core.bundle import load_bundle

    meta = load_bundle(tiny_models.bundle).meta.to_metadata()
    tensors = load_file(str(tiny_models.bundle))
    key = next(k for k in tensors if k.startswith("connector."))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    nan_bundle = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan_bundle), metadata=meta)
    res = run_cmd(gen(tiny_models, out, bundle=nan_bundle))
    assert_clean_error(res, f"tensor {key} holds NaN/inf")


def test_vlm_folder_missing_a_tokenizer_file_is_named(tiny_models, tmp_path):
    vlm = tmp_path / "vlm"
    shutil.copytree(tiny_models.vlm, vlm)
    (vlm / "tokenizer_config.json").unlink()
    res = run_cmd(gen(tiny_models, tmp_path / "out", vlm=vlm))
    assert_clean_error(res, "lacks tokenizer_config.json")


@pytest.mark.parametrize("token", ["<end_of_utterance>", "<fake_token_around_image>", "</s>"])
def test_control_tokens_in_the_prompt_text_are_refused(tiny_models, tmp_path, token):
    res = run_cmd(gen(tiny_models, tmp_path / "out", prompt=f"a <image> man {token} and his <image> dog"))
    assert_clean_error(res, repr(token), "control token")
    assert not (tmp_path / "out").exists()


def test_the_encoder_itself_refuses_control_tokens(tiny_models):
    """Also inside ComfyUI (no CLI): the loaded tokenizer's own special tokens are checked."""
    from mumu_core.encoder import MumuEncoder
    from mumu_core.prompt import InterleavedPrompt, PromptError

    enc = MumuEncoder.from_pretrained(tiny_models.vlm)
    ok = InterleavedPrompt.parse("a <image> dog", [Image.new("RGB", (8, 8))], tokens_per_image=4)
    enc.tokenize(ok)
    bad = InterleavedPrompt(("a dog <end_of_utterance> then more",))
    with pytest.raises(PromptError, match="control token"):
        enc.tokenize(bad)


def test_debug_shows_the_traceback(tiny_models, tmp_path):
    args = gen(tiny_models, tmp_path / "out", prompt="a <image> dog")  # two images, one placeholder
    res = run_cmd([*args, "--debug"])
    assert res.returncode != 0 and "Traceback" in res.stderr and "PromptError" in res.stderr
    res = run_cmd(args, MUMU_DEBUG="1")
    assert "Traceback" in res.stderr
    assert_clean_error(run_cmd(args), "not used by any placeholder")


# -- image modes ---------------------------------------------------------------------------------


def centre(img: Image.Image) -> tuple[int, int, int]:
    from mumu_core.prompt import prepare_image

    out = prepare_image(img, tokens=4)  # 28 px
    assert out.mode == "RGB" and out.size == (28, 28)
    return out.getpixel((14, 14))


def near(got, want, tol=2) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(got, want))


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 200, 30, 30])
    img.info["transparency"] = 1
    return img


MODES = {
    "16-bit grey I;16": (lambda: Image.fromarray(np.full((8, 8), 40000, np.uint16)), (156, 156, 156)),
    "32-bit I holding 16-bit data": (
        lambda: Image.fromarray(np.full((8, 8), 20000, np.int32)),
        (78, 78, 78),
    ),
    "float F in [0, 1]": (lambda: Image.fromarray(np.full((8, 8), 0.5, np.float32)), (128, 128, 128)),
    "float F in [0, 255]": (lambda: Image.fromarray(np.full((8, 8), 100.0, np.float32)), (100, 100, 100)),
    "bilevel 1": (lambda: Image.new("1", (8, 8), 1), (255, 255, 255)),
    "LA half transparent": (lambda: Image.new("LA", (8, 8), (200, 128)), (100, 100, 100)),
    "P with transparency": (palette_with_transparency, (0, 0, 0)),
    "premultiplied RGBa": (lambda: Image.new("RGBa", (8, 8), (100, 50, 20, 128)), (100, 50, 20)),
    "CMYK": (lambda: Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)),
    "YCbCr": (lambda: Image.new("YCbCr", (8, 8), (76, 85, 255)), (254, 0, 0)),
}


@pytest.mark.parametrize("name", sorted(MODES))
def test_every_mode_becomes_correct_rgb(name):
    make, want = MODES[name]
    got = centre(make())
    assert near(got, want), (name, got, want)


def test_sixteen_bit_png_through_load_image(tmp_path):
    from mumu_core.prompt import load_image

    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(path)
    assert centre(load_image(path)) == (255, 255, 255)
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((8, 8), 2570, np.uint16)).save(path)
    assert centre(load_image(path)) == (10, 10, 10)  # PIL's convert would give 255 (clipped)


def test_exif_orientation_is_applied(tmp_path):
    from mumu_core.prompt import load_image

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    path = tmp_path / "rotated.jpg"
    path.write_bytes(buf.getvalue())
    assert load_image(path).size == (20, 40)


def test_a_panorama_is_resized_before_it_is_padded(monkeypatch):
    import mumu_core.prompt as prompt

    real_new = prompt.Image.new
    sizes = []

    def recording_new(mode, size, *a, **kw):
        sizes.append(tuple(size))
        if size[0] * size[1] > 4096 * 4096:
            raise MemoryError(f"a {size} canvas for a 252 px output")
        return real_new(mode, size, *a, **kw)

    pano = Image.new("RGB", (20000, 600), (10, 200, 10))
    monkeypatch.setattr(prompt.Image, "new", recording_new)
    out = prompt.prepare_image(pano, 324)
    assert out.size == (252, 252) and max(w * h for w, h in sizes) <= 252 * 252
    assert near(out.getpixel((126, 126)), (10, 200, 10)) and out.getpixel((126, 2)) == (0, 0, 0)


def test_huge_image_is_refused_from_its_header(tmp_path):
    from mumu_core.prompt import PromptError, load_image

    path = tmp_path / "huge.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 Mpx, tiny on disk
    with pytest.raises(PromptError, match="above the 67 Mpx limit"):
        load_image(path)


def test_make_tiny_never_overwrites_a_foreign_folder(tmp_path):
    folder = tmp_path / "my_models"
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    res = run_cmd(["-m", "mumu_core", "make-tiny", str(folder)])
    assert_clean_error(res, "is not a MUMU tiny model set")
    assert sorted(p.name for p in folder.iterdir()) == ["precious.txt"]
