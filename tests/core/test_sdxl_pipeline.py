"""Offline SDXL loading (single file and diffusers folder), layout converters and MumuPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from mumu_core.pipeline import GenerationError, MumuPipeline
from mumu_core.presets import MINI, REAL, TINY
from mumu_core.prompt import InterleavedPrompt, load_image
from mumu_core.sdxl import LDM_UNET_PREFIX, SDXLLoadError, diffusers_to_ldm_unet, load_sdxl


def test_single_file_and_folder_load_the_same_weights(tiny_models):
    a, b = load_sdxl(tiny_models.sdxl, TINY), load_sdxl(tiny_models.sdxl_single_file, TINY)
    for ma, mb in ((a.unet, b.unet), (a.vae, b.vae)):
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert type(a.scheduler).__name__ == "DDIMScheduler"
    assert a.scheduler.config.prediction_type == "epsilon"


def test_real_sdxl_layout_names():
    # On the meta device: the map is checked against diffusers' converter at SDXL's real size.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL.unet)
    ldm = diffusers_to_ldm_unet(unet.state_dict(), REAL.unet)
    assert len(ldm) == 1680  # the UNet tensor count of sd_xl_base_1.0.safetensors
    for name in (
        "label_emb.0.0.weight",
        "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "output_blocks.2.2.conv.weight",
        "output_blocks.8.0.skip_connection.weight",
        "middle_block.1.transformer_blocks.9.ff.net.2.weight",
        "out.2.weight",
    ):
        assert LDM_UNET_PREFIX + name in ldm, name


def test_load_errors(tiny_models, tmp_path):
    with pytest.raises(SDXLLoadError, match="does not exist.*SDXL checkpoint"):
        load_sdxl(tmp_path / "missing.safetensors", TINY)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x02pickle")
    with pytest.raises(SDXLLoadError, match="only safetensors"):
        load_sdxl(ckpt, TINY)
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(tiny_models.sdxl_single_file.read_bytes()[:5000])
    with pytest.raises(SDXLLoadError, match="corrupt"):
        load_sdxl(bad, TINY)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(lora))
    with pytest.raises(SDXLLoadError, match="not a Stable Diffusion checkpoint"):
        load_sdxl(lora, TINY)
    # An SD 1.5-style file: UNet keys but no SDXL size/pooled embedding.
    sd15 = {k: v for k, v in load_file(str(tiny_models.sdxl_single_file)).items() if "label_emb" not in k}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(SDXLLoadError, match="not SDXL"):
        load_sdxl(tmp_path / "sd15.safetensors", TINY)
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(SDXLLoadError, match="lacks unet/config.json"):
        load_sdxl(empty, TINY)


def test_wrong_preset_for_checkpoint(tiny_models):
    with pytest.raises(SDXLLoadError, match="do not fit the preset's SDXL config"):
        load_sdxl(tiny_models.sdxl_single_file, REAL)
    with pytest.raises(SDXLLoadError, match="preset 'mini' needs"):
        load_sdxl(tiny_models.sdxl, MINI)


@pytest.fixture(scope="module")
def pipe(tiny_models) -> MumuPipeline:
    return MumuPipeline.from_paths(tiny_models.vlm, tiny_models.bundle, tiny_models.sdxl)


def test_pipeline_generates_deterministic_images(pipe, tiny_models):
    refs = [load_image(p) for p in tiny_models.images]
    p1 = InterleavedPrompt.parse("a <image> man and his <image> dog", refs, tokens_per_image=4)
    p2 = InterleavedPrompt.parse("a cat")
    images = pipe([p1, p2], seed=3, steps=2, batch=2, progress=False)
    assert len(images) == 4 and all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    again = pipe([p1], seed=3, steps=2, batch=2, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images[:2], again))
    # Different prompts (and seeds) give different images; non-square sizes work.
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[2]))
    wide = pipe(p2, seed=0, steps=1, width=48, height=32, guidance=1.0, progress=False)
    assert wide[0].size == (48, 32)


def test_pipeline_images_depend_on_reference_images(pipe, tiny_models):
    refs = [load_image(p) for p in tiny_models.images]
    a = InterleavedPrompt.parse("a <image> thing", refs[:1], tokens_per_image=4)
    b = InterleavedPrompt.parse("a <image> thing", refs[1:], tokens_per_image=4)
    ia = pipe([a], seed=0, steps=1, progress=False)[0]
    ib = pipe([b], seed=0, steps=1, progress=False)[0]
    assert not np.array_equal(np.asarray(ia), np.asarray(ib))


def test_draw_then_switches_conditioning_after_k_steps(pipe, tiny_models):
    refs = [load_image(p) for p in tiny_models.images]
    a = pipe.encode([InterleavedPrompt.parse("a <image> thing", refs[:1], tokens_per_image=4)])
    b = pipe.encode([InterleavedPrompt.parse("a cat")])  # another length: the switch may change it
    arr = lambda ims: [np.asarray(im) for im in ims]  # noqa: E731
    for guidance in (3.0, 1.0):  # with and without the classifier-free-guidance batch
        s = pipe.settings(steps=3, guidance=guidance, batch=2)
        only_a, only_b = arr(pipe.draw(a, 0, s, False)), arr(pipe.draw(b, 0, s, False))
        assert all(np.array_equal(x, y) for x, y in zip(arr(pipe.draw(a, 0, s, False, then=(0, b))), only_b))
        assert all(np.array_equal(x, y) for x, y in zip(arr(pipe.draw(a, 0, s, False, then=(3, b))), only_a))
        mixed = arr(pipe.draw(a, 0, s, False, then=(1, b)))
        assert not any(np.array_equal(x, y) for x, y in zip(mixed, only_a))
        assert not any(np.array_equal(x, y) for x, y in zip(mixed, only_b))
    with pytest.raises(GenerationError, match="one later conditioning per conditioning"):
        pipe.draw(a, 0, s, False, then=(1, b + b))
    with pytest.raises(GenerationError, match="k >= 0"):
        pipe.draw(a, 0, s, False, then=(-1, b))


def test_pipeline_settings_errors(pipe):
    for kwargs, msg in (
        ({"steps": 0}, "steps"),
        ({"width": 30}, "multiple of 8"),
        ({"height": 100000}, "multiple of 8"),
        ({"batch": 0}, "batch"),
        ({"guidance": float("nan")}, "guidance"),
    ):
        with pytest.raises(GenerationError, match=msg):
            pipe.settings(**kwargs)
    s = pipe.settings()
    assert (s.steps, s.guidance, s.width) == (TINY.num_inference_steps, TINY.guidance_scale, TINY.resolution)


def test_mini_preset_pixel_space(tmp_path):
    from mumu_core.testing import build_tiny_models

    m = build_tiny_models(tmp_path / "mini", "mini")
    assert m.sdxl_single_file is None  # pixel space: no VAE to write
    pipe = MumuPipeline.from_paths(m.vlm, m.bundle, m.sdxl)
    assert type(pipe.pipe.vae).__name__ == "PixelSpaceVAE"
    assert pipe.pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe(
        InterleavedPrompt.parse("a <image> red ball", [load_image(m.images[0])], 16), steps=2, progress=False
    )
    assert img[0].size == (24, 24)


def test_sdxl_pipeline_import_drops_only_the_torchvision_fallback_notes():
    """Importing diffusers' SDXL pipeline without torchvision makes transformers warn about two image
    processors MUMU never builds; sdxl_pipeline_class imports it without those notes (fresh processes:
    the notes are once per process)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has no fallback to warn about")

    def stderr_of(code: str) -> str:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stderr

    plain = stderr_of("from diffusers import StableDiffusionXLPipeline")
    assert "requires torchvision (not installed)" in plain  # what the helper is for
    quiet = stderr_of(
        "from mumu_core.sdxl import sdxl_pipeline_class\n"
        "cls = sdxl_pipeline_class()\n"
        "assert cls.__name__ == 'StableDiffusionXLPipeline', cls\n"
        "import logging\n"
        "logging.getLogger('transformers.utils.import_utils').warning('other notes still show')"
    )
    assert "requires torchvision" not in quiet
    assert "other notes still show" in quiet
