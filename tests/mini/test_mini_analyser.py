"""The analyser: shipped weights are the recorded ones and are accurate on held-out ground truth."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from mumu_core.mini import analyser as A
from mumu_core.mini import world as W


@pytest.fixture(scope="module")
def analyser() -> A.Analyser:
    torch.set_num_threads(1)
    return A.Analyser.load()


def test_shipped_weights_match_their_record() -> None:
    record = json.loads(A.DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    data = A.DEFAULT_WEIGHTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert len(data) < 1_000_000
    assert record["command"].startswith(A.TRAIN_COMMAND)


def test_accuracy_on_clean_heldout_renders(analyser: A.Analyser) -> None:
    acc = A.ground_truth_accuracy(analyser, n_scenes=300)
    assert acc["found"] >= 0.99 and acc["count"] >= 0.99
    assert acc["colour"] >= 0.98
    assert acc["shape"] >= 0.95
    assert acc["style"] >= 0.95


def test_accuracy_on_degraded_renders(analyser: A.Analyser) -> None:
    acc = A.ground_truth_accuracy(analyser, n_scenes=200, degrade_seed=3)
    assert acc["colour"] >= 0.95 and acc["shape"] >= 0.9 and acc["style"] >= 0.9


def test_untrained_analyser_is_not_accurate() -> None:
    # The accuracy check can fail: random weights are far from the thresholds above.
    acc = A.ground_truth_accuracy(A.Analyser.untrained(), n_scenes=60)
    assert acc["shape"] < 0.7 and acc["colour"] < 0.7


def test_predict_api(analyser: A.Analyser) -> None:
    scenes = [W.scene_at("eval", i, n_objects=1) for i in range(12)]
    pred = analyser.predict([W.render(s) for s in scenes])
    assert pred.colour_probs.shape == (12, len(W.COLOURS)) and pred.shape_probs.shape == (12, len(W.SHAPES))
    assert pred.style_probs.shape == (12, len(W.STYLES)) and pred.found.all()
    np.testing.assert_allclose(pred.colour_probs.sum(1), 1.0, rtol=1e-5)
    got = [
        (W.COLOURS[c], W.SHAPES[s]) for c, s in zip(pred.colour_probs.argmax(1), pred.shape_probs.argmax(1))
    ]
    assert got == [(s.objects[0].colour, s.objects[0].shape) for s in scenes]
    # An empty (background-only) image: nothing found, zero probabilities.
    empty = analyser.predict([W.render_background_only(scenes[0])])
    assert not empty.found[0] and empty.colour_probs.sum() == 0
    # Larger images are resized to the analyser's canvas.
    big = analyser.predict([W.render(scenes[0]).resize((96, 96))])
    assert W.COLOURS[int(big.colour_probs[0].argmax())] == scenes[0].objects[0].colour


def test_two_touching_objects_are_split_by_hue() -> None:
    rgb = np.full((24, 24, 3), 100, np.uint8)
    rgb[4:14, 2:12] = (230, 30, 30)  # red square
    rgb[4:14, 12:22] = (30, 30, 230)  # blue square, touching it
    comps = A.segment(rgb)
    assert len(comps) == 2 and {c.area for c in comps} == {100}


def test_bad_inputs(analyser: A.Analyser, tmp_path) -> None:
    with pytest.raises(A.AnalyserError, match="python -m mumu_core.mini.analyser train"):
        A.Analyser.load(tmp_path / "missing.safetensors")
    with pytest.raises(A.AnalyserError, match="uint8"):
        analyser.predict([np.zeros((24, 24), np.float32)])


def test_training_code_path_and_roundtrip(tmp_path) -> None:
    small = A.train_analyser(n_scenes=150, epochs=1, batch_size=64)
    sha = small.save(tmp_path / "a.safetensors")
    assert hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).hexdigest() == sha
    again = A.Analyser.load(tmp_path / "a.safetensors")
    imgs = [W.render(W.scene_at("eval", i)) for i in range(4)]
    # fp16 storage: probabilities agree closely.
    np.testing.assert_allclose(small.predict(imgs).colour_probs, again.predict(imgs).colour_probs, atol=2e-2)
