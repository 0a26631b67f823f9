"""Face detection and ArcFace embeddings (InsightFace antelopev2 models as ONNX, onnxruntime).

Detection: SCRFD (``scrfd_10g_bnkps.onnx``) decoded here, following InsightFace's ``scrfd.py``:
per stride (8, 16, 32) the network gives anchor scores, box distances and 5 landmark offsets in
units of the stride; boxes above the score threshold go through NMS. Landmarks let each face be
aligned to the ArcFace 112x112 template with a similarity transform, which is what glintr100 was
trained on. The documented alternative route (``GroundingFaceDetector``) takes GroundingDINO
"face" boxes and a square crop without alignment: scores from the two routes are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mumu_core.eval.models import GroundingDetector, ModelFolderError

# InsightFace's ArcFace template for 112x112 crops (left eye, right eye, nose, mouth left, mouth right).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray | None  # (5, 2) pixels, or None when the detector gives none


def _session(path: str | Path, what: str):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(
            f"{what} model {path} does not exist: put InsightFace antelopev2's "
            f"{'glintr100.onnx' if 'ArcFace' in what else 'scrfd_10g_bnkps.onnx'} there"
        )
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    order = scores.argsort()[::-1]
    keep: list[int] = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = int(order[0])
        keep.append(i)
        xx0 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy0 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx1 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy1 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        iou = inter / (area[i] + area[order[1:]] - inter + 1e-9)
        order = order[1:][iou <= iou_threshold]
    return keep


class ScrfdDetector:
    """SCRFD face detector with the InsightFace decode (anchors, distances, 5 landmarks)."""

    def __init__(
        self,
        path: str | Path,
        input_size: int = 640,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ) -> None:
        self.session = _session(path, "SCRFD face detector")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        n = len(self.output_names)
        # InsightFace's output layouts: 6/9 outputs = 3 strides with 2 anchors (9 adds landmarks),
        # 10/15 outputs = 5 strides with 1 anchor.
        layouts = {6: (3, (8, 16, 32), 2, False), 9: (3, (8, 16, 32), 2, True),
                   10: (5, (8, 16, 32, 64, 128), 1, False), 15: (5, (8, 16, 32, 64, 128), 1, True)}  # fmt: skip
        if n not in layouts:
            raise ModelFolderError(f"{path} has {n} outputs; an SCRFD model has 6, 9, 10 or 15")
        self.fmc, self.strides, self.num_anchors, self.has_kps = layouts[n]
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold

    def detect(self, image: Image.Image) -> list[Face]:
        """Faces, best score first. Boxes and landmarks in the given image's pixels."""
        rgb = image.convert("RGB")
        scale = self.input_size / max(rgb.width, rgb.height)
        nw, nh = max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))
        canvas = np.zeros((self.input_size, self.input_size, 3), dtype=np.float32)
        canvas[:nh, :nw] = np.asarray(rgb.resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
        # InsightFace feeds RGB (blobFromImage swapRB on a BGR frame), (x - 127.5) / 128.
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outs = self.session.run(self.output_names, {self.input_name: blob})
        batched = outs[0].ndim == 3
        all_scores, all_boxes, all_kps = [], [], []
        for idx, stride in enumerate(self.strides):
            scores = outs[idx][0] if batched else outs[idx]
            dist = (outs[idx + self.fmc][0] if batched else outs[idx + self.fmc]) * stride
            h, w = self.input_size // stride, self.input_size // stride
            centers = (np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            if self.num_anchors > 1:
                centers = np.repeat(centers, self.num_anchors, axis=0)
            scores = scores.reshape(-1)
            if scores.shape[0] != centers.shape[0]:
                raise ValueError(
                    f"SCRFD output for stride {stride} has {scores.shape[0]} anchors, expected "
                    f"{centers.shape[0]} for a {self.input_size}px input: is this an SCRFD model?"
                )
            pos = np.where(scores >= self.score_threshold)[0]
            d = dist.reshape(-1, 4)[pos]
            c = centers[pos]
            all_boxes.append(np.concatenate([c - d[:, :2], c + d[:, 2:]], axis=1))
            all_scores.append(scores[pos])
            if self.has_kps:
                k = (outs[idx + 2 * self.fmc][0] if batched else outs[idx + 2 * self.fmc]) * stride
                k = k.reshape(-1, 10)[pos].reshape(-1, 5, 2)
                all_kps.append(c[:, None, :] + k)
        scores = np.concatenate(all_scores)
        if scores.size == 0:
            return []
        boxes = np.concatenate(all_boxes) / scale
        kps = np.concatenate(all_kps) / scale if self.has_kps else None
        keep = nms(boxes, scores, self.nms_threshold)
        faces = []
        for i in keep:
            x0, y0, x1, y1 = boxes[i].tolist()
            box = (max(0.0, x0), max(0.0, y0), min(float(rgb.width), x1), min(float(rgb.height), y1))
            if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue
            faces.append(Face(box, float(scores[i]), None if kps is None else kps[i]))
        return faces


class GroundingFaceDetector:
    """The simpler route: GroundingDINO boxes for the phrase "face" (no landmarks, no alignment)."""

    def __init__(self, detector: GroundingDetector) -> None:
        self.detector = detector

    def detect(self, image: Image.Image) -> list[Face]:
        return [Face(d.box, d.score, None) for d in self.detector.detect(image, "face")]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 matrix of the least-squares similarity mapping ``src`` points onto ``dst`` (Umeyama)."""
    src, dst = src.astype(np.float64), dst.astype(np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1
    rot = u @ np.diag(sign) @ vt
    scale = (sig * sign).sum() / s.var(0).sum()
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image: Image.Image, face: Face, size: int = 112) -> Image.Image:
    """The 112x112 ArcFace crop: aligned by landmarks, else a square crop around the box (+10%)."""
    rgb = image.convert("RGB")
    if face.landmarks is not None:
        m = similarity_transform(face.landmarks, ARCFACE_TEMPLATE * (size / 112.0))
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # PIL wants output -> input
        return rgb.transform(
            (size, size), Image.Transform.AFFINE, tuple(inv.reshape(-1)), Image.Resampling.BILINEAR
        )
    x0, y0, x1, y1 = face.box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * 0.55
    return rgb.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half))).resize(
        (size, size), Image.Resampling.BILINEAR
    )


class ArcFaceEmbedder:
    """ArcFace (glintr100.onnx): aligned 112x112 RGB, (x - 127.5) / 127.5 -> 512-d, L2-normalised."""

    def __init__(self, path: str | Path, input_mean: float = 127.5, input_std: float = 127.5) -> None:
        self.session = _session(path, "ArcFace recognition")
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.size = int(inp.shape[2]) if isinstance(inp.shape[2], int) else 112
        self.input_mean, self.input_std = input_mean, input_std

    def embed(self, faces: list[Image.Image]) -> np.ndarray:
        if not faces:
            return np.zeros((0, 512), dtype=np.float32)
        x = np.stack(
            [np.asarray(f.convert("RGB").resize((self.size, self.size)), dtype=np.float32) for f in faces]
        )
        x = ((x - self.input_mean) / self.input_std).transpose(0, 3, 1, 2)
        # One face per run: InsightFace's models are often exported with batch size 1.
        out = np.concatenate(
            [self.session.run(None, {self.input_name: x[i : i + 1]})[0] for i in range(len(x))]
        )
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class FaceAnalyzer:
    """Detect faces and embed them. References may be tight face crops, which detectors often miss at
    full scale, so a reference with no face found is tried once more padded onto a 2x black canvas."""

    def __init__(self, detector, embedder: ArcFaceEmbedder, route: str) -> None:
        self.detector = detector
        self.embedder = embedder
        self.route = route

    def faces(self, image: Image.Image, is_reference: bool = False) -> tuple[list[Face], np.ndarray]:
        faces = self.detector.detect(image)
        src = image
        if not faces and is_reference:
            w, h = image.size
            src = Image.new("RGB", (w * 2, h * 2))
            src.paste(image.convert("RGB"), (w // 2, h // 2))
            faces = self.detector.detect(src)
        return faces, self.embedder.embed([align_face(src, f, self.embedder.size) for f in faces])
