"""The mini VLM base: shortened recipe -> an Idefics2 folder MUMU loads (perceiver removed and kept),
the check's caption parsing, resume after an interruption, the shipped folder's hashes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from mumu_core.mini import base_vlm as V
from mumu_core.mini.__main__ import main as mini_main
from mumu_core.mini.world import scene_at

TINY_RUN = V.TrainSettings(batch_size=4, max_steps=3, warmup_steps=1, checkpoint_every=100)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base_vlm") / "run"
    V.train(out, TINY_RUN, progress=False, log=lambda *_: None)
    return out


# -- captions and their parsing ---------------------------------------------------------------------


def test_scene_caption_names_count_colour_shape_style_left_to_right() -> None:
    s = scene_at("train", 3, n_objects=2, colours=["red", "blue"], shapes=["triangle", "circle"])
    cap = V.scene_caption(s)
    left = min(s.objects, key=lambda o: o.box[0] + o.box[2])
    right = max(s.objects, key=lambda o: o.box[0] + o.box[2])
    assert cap == (
        f"two shapes: a {left.colour} {left.shape} and a {right.colour} {right.shape} "
        f"on a {s.background.style} background"
    )
    p = V.parse_caption(cap)
    assert p.count == 2 and p.style == s.background.style
    assert p.objects == ((left.colour, left.shape), (right.colour, right.shape))


def test_parse_and_score_strings() -> None:
    p = V.parse_caption("two shapes: a red triangle and a blue circle on a textured background")
    assert p == V.ParsedCaption(2, (("red", "triangle"), ("blue", "circle")), "textured")
    assert V.parse_caption("one shape: a green cross on a flat background").count == 1
    assert V.parse_caption("a a a a") == V.ParsedCaption(None, (), None)
    assert V.parse_caption("a magenta square").objects == (("magenta", "square"),)
    assert V.parse_caption("a gradient background").style == "gradient"

    truth = {"objects": [["blue", "circle"], ["red", "triangle"]], "style": "textured"}
    ok = V.score_caption(
        "scene", "two shapes: a red triangle and a blue circle on a textured background", truth
    )
    assert ok == {"count": True, "colour": True, "shape": True, "object": True, "style": True}  # order-free
    swapped = V.score_caption(
        "scene", "two shapes: a red circle and a blue triangle on a flat background", truth
    )
    assert swapped == {"count": True, "colour": True, "shape": True, "object": False, "style": False}
    short = V.score_caption("scene", "one shape: a red triangle on a textured background", truth)
    assert short["count"] is False and short["colour"] is False and short["style"] is True

    crop = {"colour": "red", "shape": "cross"}
    assert V.score_caption("crop", "a red cross", crop) == {"colour": True, "shape": True, "object": True}
    assert V.score_caption("crop", "a red square", crop) == {"colour": True, "shape": False, "object": False}
    # Naming two objects for one crop is wrong on every attribute.
    assert not any(V.score_caption("crop", "a red cross and a red cross", crop).values())
    assert V.score_caption("style", "a flat background", {"style": "flat"}) == {"style": True}
    assert V.score_caption("style", "a flat", {"style": "flat"}) == {"style": False}


def test_samples_are_prepared_as_mumu_references() -> None:
    s = V.TrainSettings(batch_size=64)
    batch = V.train_batch(0, s)
    assert {x.kind for x in batch} == set(V.KINDS)
    for x in batch:
        side = {1: 4, 4: 8, 9: 12, 16: 16, 36: 24}[x.tokens]
        assert x.image.size == (side, side)
        if x.kind == "crop":
            assert x.tokens in V.REFERENCE_TOKENS and V.parse_caption(x.answer).objects
        if x.kind == "style":
            assert x.answer.endswith(" background") and V.parse_caption(x.answer).style
    assert [x.answer for x in V.train_batch(5, s)] == [x.answer for x in V.train_batch(5, s)]


# -- the shortened recipe ---------------------------------------------------------------------------


def test_short_recipe_writes_a_folder_mumu_loads_perceiver_removed_and_kept(short_run: Path) -> None:
    from mumu_core.encoder import MumuEncoder, PerceiverRemoved
    from mumu_core.prompt import ImageRef, InterleavedPrompt

    vlm = short_run / "vlm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (vlm / name).is_file(), name
    summary = json.loads((short_run / "train.json").read_text())
    assert summary["step"] == 3 and summary["status"] == "max_steps"

    crop = V.make_sample("crop", "eval", 1, np.random.default_rng(0)).image
    prompt = InterleavedPrompt(("a ", ImageRef(crop, 16), "shape and a ", ImageRef(crop, 4), "thing"))

    removed = MumuEncoder.from_pretrained(vlm)
    assert isinstance(removed.vlm.connector.perceiver_resampler, PerceiverRemoved)
    assert not any("perceiver" in n for n, _ in removed.named_parameters())
    out = removed([prompt])
    assert [(out.image_index == k).sum().item() for k in (0, 1)] == [16, 4]

    kept = MumuEncoder.from_pretrained(vlm, keep_perceiver=True)
    n = kept.n_latents
    assert any("perceiver" in name for name, _ in kept.named_parameters())
    out = kept([prompt])
    assert [(out.image_index == k).sum().item() for k in (0, 1)] == [n, n]
    assert torch.isfinite(out.hidden_states).all()


def test_kept_perceiver_equals_idefics2s_own_image_path(short_run: Path) -> None:
    """The encoder's three stages with the perceiver kept give what training fed the LM (the model's
    own get_image_features on padded pixels with pixel_attention_mask)."""
    import numpy as np

    from mumu_core.encoder import MumuEncoder
    from mumu_core.prompt import ImageRef

    model, _, mean, std = V.load_vlm(short_run / "vlm")
    enc = MumuEncoder.from_pretrained(short_run / "vlm", keep_perceiver=True)
    samples = [V.make_sample("crop", "eval", i, np.random.default_rng(i)) for i in range(4)]
    with torch.no_grad():
        ours = enc.image_features([ImageRef(s.image, s.tokens) for s in samples])
        px, mask = V.pixels([s.image for s in samples], mean, std)
        theirs = model.model.get_image_features(px, mask).pooler_output
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape == (enc.n_latents, enc.hidden_size)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_resume_after_an_interruption_continues_at_the_saved_step(
    tmp_path: Path, monkeypatch, one_thread
) -> None:
    settings = V.TrainSettings(batch_size=2, max_steps=5, warmup_steps=1, checkpoint_every=100)
    straight = tmp_path / "straight"
    V.train(straight, settings, progress=False, log=lambda *_: None)

    real_batch = V.train_batch

    def interrupting(step, s, patch=4):
        if step == 2:  # SIGTERM arrives during step 2: the step finishes, then the run saves and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real_batch(step, s, patch)

    run = tmp_path / "run"
    monkeypatch.setattr(V, "train_batch", interrupting)
    first = V.train(run, settings, progress=False, log=lambda *_: None)
    assert first["status"] == "SIGTERM" and first["step"] == 3
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 3
    assert (run / "vlm" / "model.safetensors").is_file(), "an interrupted run still writes its folder"

    monkeypatch.setattr(V, "train_batch", real_batch)
    logs: list[str] = []
    second = V.train(run, settings, progress=False, log=logs.append)
    assert any("at step 3" in m for m in logs) and second["step"] == 5
    from safetensors.torch import load_file

    a = load_file(str(straight / "checkpoint" / "model.safetensors"))
    b = load_file(str(run / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # same batches, same optimizer state: the resumed run is the uninterrupted one
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)

    with pytest.raises(V.BaseVLMError, match="other settings"):
        V.train(run, V.TrainSettings(batch_size=3, max_steps=6), progress=False)


def test_continue_from_a_finished_base_with_other_kind_weights(short_run: Path, tmp_path: Path) -> None:
    """--init starts from the given base's weights (its learned perceiver latents too), not a random
    init; --kind-weights sets the batch mix."""
    from safetensors.torch import load_file

    style_only = V.TrainSettings(batch_size=6, kind_weights=(0.0, 0.0, 1.0))
    assert {x.kind for x in V.train_batch(0, style_only)} == {"style"}
    run = tmp_path / "second"
    V.train(
        run,
        V.TrainSettings(
            batch_size=2,
            max_steps=1,
            warmup_steps=0,
            init=str(short_run / "vlm"),
            kind_weights=(0.0, 0.0, 1.0),
            seed=5,  # a fresh init would draw other latents than the base's
        ),
        progress=False,
        log=lambda *_: None,
    )
    src = load_file(str(short_run / "vlm" / "model.safetensors"))
    init = load_file(str(run / "init" / "model.safetensors"))
    assert src.keys() == init.keys() and all(torch.equal(src[k], init[k]) for k in src)
    latents = next(k for k in src if k.endswith("perceiver_resampler.latents"))
    after = load_file(str(run / "vlm" / "model.safetensors"))
    # One small step moved the weights a little from the base, not to a fresh random init.
    assert 0 < (after[latents] - src[latents]).abs().max() < 0.1
    assert json.loads((run / "settings.json").read_text())["init"] == str(short_run / "vlm")


def test_cli_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert mini_main(["base-vlm", "check", "--vlm", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert mini_main(["base-vlm", "train", "--out", str(tmp_path / "r"), "--max-steps", "0"]) == 2
    assert not (tmp_path / "r").exists(), "bad settings fail before anything is written"
    bad_init = ["base-vlm", "train", "--out", str(tmp_path / "r"), "--init", str(tmp_path / "nobase")]
    assert mini_main(bad_init) == 2
    assert "nobase does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "a missing --init folder fails before anything is written"
    assert mini_main(["base-vlm", "ship", "--run", str(tmp_path)]) == 2
    assert "not a finished base-vlm run" in capsys.readouterr().err


def test_ship_writes_float16_and_hashes(short_run: Path, tmp_path: Path, one_thread) -> None:
    dest, record = tmp_path / "base" / "vlm", tmp_path / "base" / "vlm.json"
    meta = V.ship(short_run, dest, record, command="test", n_check=1, log=lambda *_: None)
    assert meta["steps"] == 3 and meta["command"] == "test" and meta["dtype"] == "float16"
    assert set(meta["check"]["accuracy"]) == set(V.KINDS)
    from safetensors import safe_open

    with safe_open(str(dest / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert V.verify_shipped(dest, record)["files"] == meta["files"]
    (dest / "config.json").write_text((dest / "config.json").read_text() + " ")
    with pytest.raises(V.BaseVLMError, match="config.json"):
        V.verify_shipped(dest, record)


# -- the shipped base -------------------------------------------------------------------------------


def test_shipped_base_matches_its_record() -> None:
    meta = V.verify_shipped()
    total = sum(p.stat().st_size for p in V.SHIP_DIR.rglob("*") if p.is_file())
    assert total < 2_000_000, f"the shipped VLM base should stay small, it is {total / 1e6:.2f} MB"
    for key in ("command", "hardware", "wall_s", "steps", "files"):
        assert meta.get(key), f"vlm.json lacks {key}"
    # The check's accuracies, or (when it could not run where the base was shipped) a note saying why.
    assert "check" in meta and (meta["check"] and meta["check"]["accuracy"] or meta.get("check_note"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(
        meta["files"]
    )
    from mumu_core.encoder import MumuEncoder, PerceiverRemoved

    enc = MumuEncoder.from_pretrained(V.SHIP_DIR)
    assert isinstance(enc.vlm.connector.perceiver_resampler, PerceiverRemoved)
