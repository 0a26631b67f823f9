import json

import numpy as np
import pytest
import torch
from eval_tiny_models import SCRFD_INPUT, face_image, noise
from PIL import Image

from mumu_core.eval.cli import main
from mumu_core.eval.faces import ArcFaceEmbedder, FaceAnalyzer, ScrfdDetector
from mumu_core.eval.manifest import EvalCase, Manifest, save_manifest
from mumu_core.eval.metrics import EvalInputError, Evaluator, aggregate, best_assignment
from mumu_core.eval.models import ClipScorer, Detection, DinoScorer, GroundingDetector, ModelFolderError
from mumu_core.eval.report import write_results


@pytest.fixture(scope="module")
def clip(models):
    return ClipScorer(models / "clip")


@pytest.fixture(scope="module")
def dino(models):
    return DinoScorer(models / "dino")


@pytest.fixture(scope="module")
def faces(models):
    det = ScrfdDetector(models / "antelopev2" / "scrfd_10g_bnkps.onnx", input_size=SCRFD_INPUT)
    return FaceAnalyzer(det, ArcFaceEmbedder(models / "antelopev2" / "glintr100.onnx"), "scrfd")


def save(im: Image.Image, path) -> object:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


class FakeDetector:
    """Known boxes per phrase, to test the matching without a trained detector."""

    def __init__(self, boxes: dict[str, list[tuple]]):
        self.boxes = boxes

    def detect(self, image, phrase):
        return [Detection(b, 0.9 - 0.1 * i, phrase) for i, b in enumerate(self.boxes.get(phrase, []))]


def pasted(ref: Image.Image, at: tuple[int, int], seed: int = 50, size=(96, 96)) -> Image.Image:
    canvas = noise(seed, size)
    canvas.paste(ref, at)
    return canvas


def test_best_assignment_is_one_to_one_and_optimal():
    sim = np.array([[0.9, 0.8], [0.85, 0.1]])  # greedy would take (0,0) then (1,1): total 1.0
    assert best_assignment(sim) == [(0, 1), (1, 0)]
    assert best_assignment(np.zeros((2, 0))) == []
    assert best_assignment(np.array([[0.1, 0.5, 0.2]])) == [(0, 1)]


def test_clip_i_dino_and_clip_t(tmp_path, clip, dino):
    ref = save(noise(10), tmp_path / "ref.png")
    same = save(noise(10), tmp_path / "same.png")
    other = save(noise(11), tmp_path / "other.png")
    case = EvalCase("c", "a <image> dog on the beach", (ref,), (same, other))
    seen = []
    orig = clip.text_embeds
    clip.text_embeds = lambda texts: seen.extend(texts) or orig(texts)
    try:
        res = Evaluator(clip, dino, metrics=["clip_t", "clip_i", "dino"]).evaluate_case(case)
    finally:
        del clip.text_embeds
    a, b = res.images
    assert a.clip_i == pytest.approx(1.0, abs=1e-5) and a.dino == pytest.approx(1.0, abs=1e-5)
    assert b.clip_i < a.clip_i and b.dino < a.dino
    assert seen == ["a dog on the beach"]  # CLIP-T sees the text without placeholders
    text = orig(["a dog on the beach"])
    expect = torch.nn.functional.cosine_similarity(clip.image_embeds([noise(11)]), text).item()
    assert b.clip_t == pytest.approx(expect, abs=1e-5)
    assert res.metric("clip_i") == pytest.approx((a.clip_i + b.clip_i) / 2)
    assert a.mm_clip is None and a.face is None  # not requested: not reported


def test_subject_images_average_over_all_subject_photos(tmp_path, clip):
    r1, r2 = save(noise(20), tmp_path / "r1.png"), save(noise(21), tmp_path / "r2.png")
    gen = save(noise(20), tmp_path / "g.png")
    case = EvalCase("c", "a <image> cat", (r1,), (gen,), subject_images=((r1, r2),))
    got = Evaluator(clip, metrics=["clip_i"]).evaluate_case(case).images[0].clip_i
    e = torch.nn.functional.normalize(clip.image_embeds([noise(20), noise(21)]), dim=-1)
    assert got == pytest.approx(float((e[0] @ e.T).mean()), abs=1e-5)
    assert got < 1.0


def test_mm_clip_crops_the_matched_object(tmp_path, clip):
    ref_im = noise(30, (32, 32))
    ref = save(ref_im, tmp_path / "man.png")
    gen = save(pasted(ref_im, (40, 20)), tmp_path / "g.png")
    case = EvalCase("c", "a <image> man in a park", (ref,), (gen,))
    right = Evaluator(clip, detector=FakeDetector({"man": [(40, 20, 72, 52)]}), metrics=["mm_clip"])
    wrong = Evaluator(clip, detector=FakeDetector({"man": [(0, 60, 32, 92)]}), metrics=["mm_clip"])
    r, w = right.evaluate_case(case).images[0], wrong.evaluate_case(case).images[0]
    assert r.mm_clip == pytest.approx(1.0, abs=1e-5) and r.mm_clip > w.mm_clip
    assert r.objects == [
        {
            "ref": 0,
            "phrase": "man",
            "found": True,
            "box": [40, 20, 72, 52],
            "det_score": 0.9,
            "clip": r.mm_clip,
        }
    ]


def test_repeated_phrases_take_distinct_boxes(tmp_path, clip):
    d1, d2 = noise(31, (32, 32)), noise(32, (32, 32))
    canvas = noise(50, (96, 96))
    canvas.paste(d1, (0, 0))
    canvas.paste(d2, (60, 60))
    case = EvalCase(
        "c",
        "a <image> dog and a <image> dog",
        (save(d1, tmp_path / "d1.png"), save(d2, tmp_path / "d2.png")),
        (save(canvas, tmp_path / "g.png"),),
    )
    # The detector ranks d2's box first; matching must still pair each reference with its own dog.
    det = FakeDetector({"dog": [(60, 60, 92, 92), (0, 0, 32, 32), (30, 30, 62, 62)]})
    img = Evaluator(clip, detector=det, metrics=["mm_clip"]).evaluate_case(case).images[0]
    assert [o["box"] for o in img.objects] == [[0, 0, 32, 32], [60, 60, 92, 92]]
    assert img.mm_clip == pytest.approx(1.0, abs=1e-5)


def test_missing_objects_are_counted_not_averaged_as_zero(tmp_path, clip):
    man, dog = noise(33, (32, 32)), noise(34, (32, 32))
    case = EvalCase(
        "c",
        "a <image> man and his <image> dog",
        (save(man, tmp_path / "m.png"), save(dog, tmp_path / "d.png")),
        (save(pasted(man, (0, 0)), tmp_path / "g.png"),),
    )
    res = Evaluator(
        clip, detector=FakeDetector({"man": [(0, 0, 32, 32)]}), metrics=["mm_clip"]
    ).evaluate_case(case)
    img = res.images[0]
    assert (img.objects_found, img.objects_missing) == (1, 1)
    assert img.mm_clip == pytest.approx(1.0, abs=1e-5)  # the mean covers found objects only
    assert img.objects[1] == {"ref": 1, "phrase": "dog", "found": False, "box": None, "det_score": None,
                              "clip": None}  # fmt: skip
    agg = aggregate([res])
    assert agg["objects_missing"] == 1 and agg["objects_found_rate"] == 0.5
    assert agg["mm_clip"] == pytest.approx(1.0, abs=1e-5)

    nothing = Evaluator(clip, detector=FakeDetector({}), metrics=["mm_clip"]).evaluate_case(case).images[0]
    assert nothing.mm_clip is None and nothing.objects_missing == 2


def test_tiny_grounding_dino_end_to_end(tmp_path, models, clip):
    det = GroundingDetector(models / "gdino", box_threshold=0.0, text_threshold=0.0)
    red = Image.new("RGB", (80, 60), (200, 20, 20))
    dets = det.detect(red, "dog")
    assert dets and all(0 <= d.box[0] < d.box[2] <= 80 and 0 <= d.box[1] < d.box[3] <= 60 for d in dets)
    assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)

    ref = save(Image.new("RGB", (40, 40), (200, 20, 20)), tmp_path / "ref.png")
    same = save(red, tmp_path / "same.png")
    other = save(noise(40, (80, 60)), tmp_path / "other.png")
    case = EvalCase("c", "a <image> dog", (ref,), (same, other))
    a, b = Evaluator(clip, detector=det, metrics=["mm_clip"]).evaluate_case(case).images
    assert a.mm_clip == pytest.approx(1.0, abs=1e-5)  # any crop of a solid image is that solid image
    assert b.mm_clip < a.mm_clip

    never = GroundingDetector(models / "gdino", box_threshold=1.01)  # sigmoid scores never pass
    img = Evaluator(clip, detector=never, metrics=["mm_clip"]).evaluate_case(case).images[0]
    assert img.mm_clip is None and img.objects_missing == 1


def test_face_similarity_and_missing_faces(tmp_path, faces):
    person = save(face_image(1, cell=(1, 1)), tmp_path / "person.png")
    hat = save(noise(5, lo=0, hi=60), tmp_path / "hat.png")  # a reference with no face
    moved = save(face_image(1, cell=(2, 2)), tmp_path / "moved.png")
    stranger = save(face_image(2, cell=(1, 1)), tmp_path / "stranger.png")
    empty = save(Image.new("RGB", (64, 64)), tmp_path / "empty.png")
    case = EvalCase("c", "a <image> man wearing a <image> hat", (person, hat), (moved, stranger, empty))
    res = Evaluator(faces=faces, metrics=["face"]).evaluate_case(case)
    same, other, none = res.images
    assert [r["has_face"] for r in res.reference_faces] == [True, False]
    assert same.face == pytest.approx(1.0, abs=1e-4)  # same face elsewhere: alignment undoes the shift
    assert other.face < same.face
    assert none.face is None and none.faces == [{"ref": 0, "found": False, "sim": None, "box": None}]
    assert none.generated_faces == 0
    agg = aggregate([res])
    assert agg["faces_missing"] == 1 and agg["faces_found"] == 2 and agg["face_n"] == 2


def test_missing_inputs_and_models_fail_clearly(tmp_path, clip):
    case = EvalCase("c", "a <image> dog", (tmp_path / "nope.png",), (tmp_path / "gen.png",))
    with pytest.raises(EvalInputError, match="nope.png|gen.png"):
        Evaluator(clip, metrics=["clip_i"]).evaluate_case(case)
    with pytest.raises(ValueError, match="DINO"):
        Evaluator(clip, metrics=["dino"])
    with pytest.raises(ModelFolderError, match="does not exist"):
        ClipScorer(tmp_path / "no-clip")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "preprocessor_config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="safetensors"):
        DinoScorer(tmp_path / "pickled")


def test_report_and_cli_end_to_end(tmp_path, models, capsys):
    man = noise(60, (32, 32))
    refs = [save(man, tmp_path / "refs" / "man.png"), save(face_image(1), tmp_path / "refs" / "face.png")]
    g0 = save(pasted(man, (10, 10)), tmp_path / "gen" / "a_s0.png")
    g1 = save(face_image(1, cell=(2, 1)), tmp_path / "gen" / "b_s0.png")
    m = Manifest(
        (
            EvalCase("a", "a <image> man in the snow", (refs[0],), (g0,), group="g", seeds=(0,)),
            EvalCase("b", "a <image> face portrait", (refs[1],), (g1,), group="g", seeds=(0,)),
        )
    )
    mpath = save_manifest(m, tmp_path / "manifest.json")
    out = tmp_path / "results"
    base = ["run", "--manifest", str(mpath), "--out", str(out)]
    assert main([*base, "--clip", str(models / "clip")]) == 2
    err = capsys.readouterr().err
    assert "--dino" in err and "--grounding-dino" in err and "--faces" in err and "--clip" not in err
    rc = main([*base, "--clip", str(models / "clip"), "--dino", str(models / "dino"),
               "--grounding-dino", str(models / "gdino"), "--box-threshold", "0", "--text-threshold", "0",
               "--faces", str(models / "antelopev2"), "--face-det-size", str(SCRFD_INPUT)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert [c["id"] for c in data["cases"]] == ["a", "b"]
    assert data["aggregate"]["images"] == 2 and data["aggregate"]["face"] == pytest.approx(1.0, abs=1e-4)
    assert set(data["groups"]) == {"g"}
    assert data["cases"][1]["images"][0]["faces"][0]["found"] is True
    assert (out / "cases.csv").read_text().count("\n") == 3
    assert (out / "images.csv").read_text().splitlines()[0].startswith("case,image,seed,clip_t")
    html = (out / "report.html").read_text()
    assert "a &lt;image&gt; man in the snow" in html and html.count("<section>") == 2
    assert Image.open(out / "grid.png").size[0] == 2 * 160
    assert "clip_t" in capsys.readouterr().out

    # A missing generated image is an error naming the file, not a silent zero.
    g1.unlink()
    assert main([*base, "--metrics", "clip_t", "--clip", str(models / "clip")]) == 2
    assert "b_s0.png" in capsys.readouterr().err


def test_write_results_handles_metrics_not_run(tmp_path, clip):
    gen = save(noise(70), tmp_path / "g.png")
    res = Evaluator(clip, metrics=["clip_t"]).evaluate(
        Manifest((EvalCase("t", "a red car", (), (gen,)),)), False
    )
    paths = write_results(res, tmp_path / "out")
    row = (tmp_path / "out" / "cases.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "t" and row[4] == ""  # clip_i is blank, not 0
    assert paths["grid"].is_file()
