import numpy as np
import pytest
from eval_tiny_models import SCRFD_INPUT, SCRFD_KPS, build_scrfd, face_image, noise
from PIL import Image

from mumu_core.eval.faces import (
    ARCFACE_TEMPLATE,
    ArcFaceEmbedder,
    Face,
    FaceAnalyzer,
    ScrfdDetector,
    align_face,
    nms,
    similarity_transform,
)
from mumu_core.eval.models import ModelFolderError


def test_similarity_transform_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = 0.3, 1.7, np.array([5.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-9)


def test_align_maps_landmarks_onto_the_template():
    # Put distinct colours at the landmark positions; after alignment they sit at the template points.
    im = Image.new("RGB", (200, 200))
    lm = ARCFACE_TEMPLATE * 1.5 + np.array([20.0, 10.0])
    px = im.load()
    for k, (x, y) in enumerate(lm):
        for dx in range(-2, 3):
            for dy in range(-2, 3):
                px[int(round(x)) + dx, int(round(y)) + dy] = (255, 50 * k, 0)
    out = np.asarray(align_face(im, Face((0, 0, 200, 200), 1.0, lm)))
    assert out.shape == (112, 112, 3)
    for k, (x, y) in enumerate(ARCFACE_TEMPLATE):
        r, g, _ = out[int(round(y)), int(round(x))].astype(int)
        assert r > 200 and abs(g - 50 * k) <= 15  # the k-th landmark lands on the k-th template point


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], dtype=float)
    assert nms(boxes, np.array([0.8, 0.9, 0.5]), 0.4) == [1, 2]


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decode_finds_the_bright_square(tmp_path, batched):
    path = tmp_path / "scrfd.onnx"
    build_scrfd(path, batched=batched)
    det = ScrfdDetector(path, input_size=SCRFD_INPUT)
    assert det.has_kps and det.strides == (8, 16, 32) and det.num_anchors == 2

    faces = det.detect(face_image(0, 64, cell=(2, 1)))
    assert len(faces) == 1  # two anchors per cell, merged by NMS
    # Anchor centre of cell (col 2, row 1) at stride 16 is (32, 16); boxes are +-1 stride.
    np.testing.assert_allclose(faces[0].box, (16, 0, 48, 32), atol=1e-3)
    assert faces[0].score > 0.99
    expected = np.array([32.0, 16.0]) + 16 * np.array(SCRFD_KPS).reshape(5, 2)
    np.testing.assert_allclose(faces[0].landmarks, expected, atol=1e-3)

    # The image is resized to the detector input: boxes come back in the original pixels.
    big = det.detect(face_image(0, 128, cell=(2, 1)))
    np.testing.assert_allclose(big[0].box, (32, 0, 96, 64), atol=1e-3)

    assert det.detect(Image.new("RGB", (64, 64))) == []


def test_missing_onnx_files_say_what_belongs_there(tmp_path):
    with pytest.raises(ModelFolderError, match="glintr100.onnx"):
        ArcFaceEmbedder(tmp_path / "glintr100.onnx")
    with pytest.raises(ModelFolderError, match="scrfd_10g_bnkps.onnx"):
        ScrfdDetector(tmp_path / "scrfd.onnx")


def test_arcface_same_face_beats_other_face(models):
    det = ScrfdDetector(models / "antelopev2" / "scrfd_10g_bnkps.onnx", input_size=SCRFD_INPUT)
    fa = FaceAnalyzer(det, ArcFaceEmbedder(models / "antelopev2" / "glintr100.onnx"), "scrfd")
    f_ref, e_ref = fa.faces(face_image(1, cell=(1, 1)), is_reference=True)
    f_same, e_same = fa.faces(face_image(1, cell=(1, 1)))
    f_other, e_other = fa.faces(face_image(2, cell=(1, 1)))
    assert e_ref.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(e_ref, axis=1), 1.0, atol=1e-5)
    assert float(e_ref[0] @ e_same[0]) > 0.9999
    assert float(e_ref[0] @ e_same[0]) > float(e_ref[0] @ e_other[0])
    assert fa.faces(noise(3, lo=0, hi=60))[0] == []  # dark noise: no face


def test_grounding_face_route_crops_without_landmarks(models):
    from mumu_core.eval.faces import GroundingFaceDetector
    from mumu_core.eval.models import GroundingDetector

    det = GroundingFaceDetector(GroundingDetector(models / "gdino", box_threshold=0.0, text_threshold=0.0))
    fa = FaceAnalyzer(det, ArcFaceEmbedder(models / "antelopev2" / "glintr100.onnx"), "grounding")
    faces, embs = fa.faces(face_image(1))
    assert faces and all(f.landmarks is None for f in faces)
    assert embs.shape == (len(faces), 512)
    assert align_face(face_image(1), faces[0]).size == (112, 112)
