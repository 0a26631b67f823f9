"""The perceiver-kept switch (Finding 1's ablation): encoder, bundle metadata, loading (the trainer's
``model.keep_perceiver``: tests/train/test_train_keep_perceiver.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from mumu_core import bundle as B
from mumu_core.connector import MumuConnector
from mumu_core.encoder import EncoderLoadError, MumuEncoder, PerceiverRemoved
from mumu_core.presets import TINY
from mumu_core.prompt import InterleavedPrompt


@pytest.fixture(scope="module")
def kept(tiny_models) -> MumuEncoder:
    return MumuEncoder.from_pretrained(tiny_models.vlm, keep_perceiver=True)


def prompt(tokens: list[int]) -> InterleavedPrompt:
    imgs = [Image.new("RGB", (30, 20), (200, 10 * i, 0)) for i in range(len(tokens))]
    text = "a " + " and ".join(["<image>thing"] * len(tokens))
    return InterleavedPrompt.parse(text, imgs, tokens_per_image=tokens)


@pytest.mark.parametrize("tokens", [[4], [16], [4, 16]])
def test_each_image_becomes_n_latents_tokens_whatever_the_budget(kept, tiny_models, tokens):
    n = TINY.vlm["perceiver_config"]["resampler_n_latents"]
    assert kept.n_latents == n and kept.keep_perceiver
    assert not isinstance(kept.vlm.connector.perceiver_resampler, PerceiverRemoved)
    with torch.no_grad():
        out = kept([prompt(tokens)])
    assert [(out.image_index[0] == j).sum().item() for j in range(len(tokens))] == [n] * len(tokens)
    removed = MumuEncoder.from_pretrained(tiny_models.vlm)
    with torch.no_grad():
        out_r = removed([prompt(tokens)])
    assert [(out_r.image_index[0] == j).sum().item() for j in range(len(tokens))] == tokens
    # Everything but the image tokens is identical: same text ids around them.
    ids_k = kept.tokenize(prompt(tokens))
    ids_r = removed.tokenize(prompt(tokens))
    strip = [kept.image_token_id]
    assert [i for i in ids_k if i not in strip] == [i for i in ids_r if i not in strip]


def test_kept_features_are_the_perceivers_output(kept):
    from mumu_core.prompt import ImageRef

    ref = ImageRef(Image.new("RGB", (28, 28), (0, 200, 0)), 4)
    with torch.no_grad():
        (feat,) = kept.image_features([ref])
        px = kept.pixels(ref)[None]
        h = kept.vlm.connector.modality_projection(kept.vlm.vision_model(pixel_values=px).last_hidden_state)
        mask = torch.ones(h.shape[:2], dtype=torch.bool)
        want = kept.vlm.connector.perceiver_resampler(context=h, attention_mask=mask)[0]
    torch.testing.assert_close(feat, want)


def test_keep_after_removal_is_refused(tiny_models):
    removed = MumuEncoder.from_pretrained(tiny_models.vlm)
    with pytest.raises(EncoderLoadError, match="already removed"):
        MumuEncoder(removed.vlm, removed.tokenizer, [0.5] * 3, [0.5] * 3, keep_perceiver=True)


def test_bundle_records_keep_perceiver_and_old_bundles_stay_format_1(kept, tiny_models, tmp_path):
    connector = MumuConnector(TINY.connector)
    plain = B.make_bundle(TINY, connector)
    assert plain.meta.keep_perceiver is False
    path = B.save_bundle(plain, tmp_path / "plain.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert "mumu.keep_perceiver" not in meta and json.loads(meta["mumu.format_version"]) == 1

    b = B.make_bundle(TINY, connector, encoder=kept)
    assert b.meta.keep_perceiver is True
    path = B.save_bundle(b, tmp_path / "kept.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["mumu.keep_perceiver"]) is True
    assert json.loads(meta["mumu.format_version"]) == B.KEEP_PERCEIVER_FORMAT_VERSION  # old readers refuse it
    loaded = B.load_bundle(path)
    assert loaded.meta.keep_perceiver is True

    # The session's tiny bundle was written by make_bundle without the key: it loads as removed.
    assert B.load_bundle(tiny_models.bundle).meta.keep_perceiver is False

    bad = dataclasses.replace(b, meta=dataclasses.replace(b.meta, keep_perceiver="yes"))
    with pytest.raises(B.BundleError, match="keep_perceiver"):
        B.load_bundle(B.save_bundle(bad, tmp_path / "bad.safetensors"))


def test_loading_honours_the_bundle(tiny_models, tmp_path):
    from mumu_core.pipeline import MumuPipeline

    base = B.load_bundle(tiny_models.bundle)
    kept_b = dataclasses.replace(base, meta=dataclasses.replace(base.meta, keep_perceiver=True))
    path = B.save_bundle(kept_b, tmp_path / "kept.safetensors")
    cond = B.load_conditioner(tiny_models.vlm, B.load_bundle(path))
    assert cond.encoder.keep_perceiver
    assert not isinstance(cond.encoder.vlm.connector.perceiver_resampler, PerceiverRemoved)
    pipe = MumuPipeline.from_paths(tiny_models.vlm, path, tiny_models.sdxl)
    assert pipe.conditioner.encoder.keep_perceiver
    n = TINY.vlm["perceiver_config"]["resampler_n_latents"]
    with torch.no_grad():
        c = pipe.encode([prompt([16])])[0]
    assert c.context.shape[1] == len(pipe.conditioner.encoder.tokenize(prompt([16])))
    assert (
        sum(1 for i in pipe.conditioner.encoder.tokenize(prompt([16])) if i == cond.encoder.image_token_id)
        == n
    )
    plain = B.load_conditioner(tiny_models.vlm, base)
    assert not plain.encoder.keep_perceiver
