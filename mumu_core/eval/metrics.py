"""Scoring cases: multimodal CLIP score, DreamBench CLIP-I / CLIP-T / DINO, and face similarity.

Every score is a raw cosine similarity in [-1, 1] (no CLIPScore x2.5 or x100 rescaling). A case's
score is the mean over its generated images; the aggregate is the mean over all generated images
(equal to the mean over cases when every case has the same number of seeds). Objects or faces that
were not found are counted, never folded into a mean as zeros.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mumu_core.eval.manifest import EvalCase, Manifest
from mumu_core.eval.models import ClipScorer, Detection, DinoScorer, GroundingDetector, cosine_matrix, crop
from mumu_core.prompt import PromptError, check_image, to_rgb_on_black

METRICS = ("clip_t", "clip_i", "dino", "mm_clip", "face")


class EvalInputError(ValueError):
    """An image named by the manifest cannot be read; the message names the case and file."""


def load_image(path: Path, case_id: str) -> Image.Image:
    if not path.is_file():
        raise EvalInputError(
            f"case {case_id!r}: image {path} does not exist (generate it first, or fix the path)"
        )
    try:
        with Image.open(path) as im:
            im.load()
            check_image(im)
            # Transparent backgrounds become black, as the MUMU encoder sees its references.
            return to_rgb_on_black(im)
    except PromptError as e:
        raise EvalInputError(f"case {case_id!r}: {path}: {e}") from e
    except OSError as e:
        raise EvalInputError(f"case {case_id!r}: {path} is not a readable image: {e}") from e


def best_assignment(sim: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs (row, col) maximising total similarity; exact for small matrices, greedy above."""
    n, m = sim.shape
    if n == 0 or m == 0:
        return []
    if math.perm(max(n, m), min(n, m)) <= 50_000:
        best, best_pairs = -math.inf, []
        if n <= m:
            for cols in itertools.permutations(range(m), n):
                total = sum(sim[i, c] for i, c in enumerate(cols))
                if total > best:
                    best, best_pairs = total, list(enumerate(cols))
        else:
            for rows in itertools.permutations(range(n), m):
                total = sum(sim[r, j] for j, r in enumerate(rows))
                if total > best:
                    best, best_pairs = total, [(r, j) for j, r in enumerate(rows)]
        return sorted(best_pairs)
    pairs, used_r, used_c = [], set(), set()
    for flat in np.argsort(-sim, axis=None):
        i, j = divmod(int(flat), m)
        if i not in used_r and j not in used_c:
            pairs.append((i, j))
            used_r.add(i)
            used_c.add(j)
    return sorted(pairs)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


@dataclass
class ImageScores:
    image: str
    seed: int | None = None
    clip_t: float | None = None
    clip_i: float | None = None
    dino: float | None = None
    mm_clip: float | None = None
    face: float | None = None
    objects: list[dict] = field(default_factory=list)
    faces: list[dict] = field(default_factory=list)
    generated_faces: int | None = None

    @property
    def objects_found(self) -> int:
        return sum(o["found"] for o in self.objects)

    @property
    def objects_missing(self) -> int:
        return sum(not o["found"] for o in self.objects)

    @property
    def faces_found(self) -> int:
        return sum(f["found"] for f in self.faces)

    @property
    def faces_missing(self) -> int:
        return sum(not f["found"] for f in self.faces)


@dataclass
class CaseScores:
    case: EvalCase
    images: list[ImageScores]
    reference_faces: list[dict] = field(default_factory=list)

    def metric(self, name: str) -> float | None:
        return _mean([getattr(i, name) for i in self.images])

    def to_dict(self) -> dict:
        c = self.case
        return {
            "id": c.id,
            "group": c.group,
            "prompt": c.prompt,
            "references": [str(p) for p in c.references],
            **{m: self.metric(m) for m in METRICS},
            "objects_found": sum(i.objects_found for i in self.images),
            "objects_missing": sum(i.objects_missing for i in self.images),
            "faces_found": sum(i.faces_found for i in self.images),
            "faces_missing": sum(i.faces_missing for i in self.images),
            "reference_faces": self.reference_faces,
            "images": [
                {
                    "image": i.image,
                    "seed": i.seed,
                    **{m: getattr(i, m) for m in METRICS},
                    "objects": i.objects,
                    "faces": i.faces,
                    "generated_faces": i.generated_faces,
                }
                for i in self.images
            ],
        }


def aggregate(results: Sequence[CaseScores]) -> dict:
    """Means over all generated images, with how many images each mean covers, and missing counts."""
    images = [i for r in results for i in r.images]
    out: dict = {"cases": len(results), "images": len(images)}
    for m in METRICS:
        vals = [getattr(i, m) for i in images if getattr(i, m) is not None]
        out[m] = float(np.mean(vals)) if vals else None
        out[f"{m}_n"] = len(vals)
    found = sum(i.objects_found for i in images)
    missing = sum(i.objects_missing for i in images)
    out.update(objects_found=found, objects_missing=missing)
    out["objects_found_rate"] = found / (found + missing) if found + missing else None
    ffound = sum(i.faces_found for i in images)
    fmissing = sum(i.faces_missing for i in images)
    out.update(faces_found=ffound, faces_missing=fmissing)
    out["faces_found_rate"] = ffound / (ffound + fmissing) if ffound + fmissing else None
    return out


def aggregate_by_group(results: Sequence[CaseScores]) -> dict[str, dict]:
    groups: dict[str, list[CaseScores]] = {}
    for r in results:
        if r.case.group is not None:
            groups.setdefault(r.case.group, []).append(r)
    return {g: aggregate(rs) for g, rs in sorted(groups.items())}


class Evaluator:
    """Scores manifest cases with whichever models it is given; a metric whose model is absent is
    not in ``metrics`` and is never reported (the CLI refuses to run a requested metric without its model)."""

    def __init__(
        self,
        clip: ClipScorer | None = None,
        dino: DinoScorer | None = None,
        detector: GroundingDetector | None = None,
        faces=None,  # FaceAnalyzer
        metrics: Sequence[str] | None = None,
    ) -> None:
        available = {
            "clip_t": clip is not None,
            "clip_i": clip is not None,
            "dino": dino is not None,
            "mm_clip": clip is not None and detector is not None,
            "face": faces is not None,
        }
        self.metrics = tuple(m for m in METRICS if available[m]) if metrics is None else tuple(metrics)
        for m in self.metrics:
            if m not in available:
                raise ValueError(f"unknown metric {m!r}; choose from {list(METRICS)}")
            if not available[m]:
                need = {"clip_t": "CLIP", "clip_i": "CLIP", "dino": "DINO", "mm_clip": "CLIP and GroundingDINO",
                        "face": "the face models"}[m]  # fmt: skip
                raise ValueError(f"metric {m!r} needs {need}; give the model or drop the metric")
        self.clip, self.dino, self.detector, self.face_analyzer = clip, dino, detector, faces
        self._cache: dict[tuple[str, str], object] = {}

    def _embed_paths(self, kind: str, scorer, paths: Sequence[Path], case_id: str) -> torch.Tensor:
        # Reference and subject photos recur across many cases (DreamBench: 25 prompts per subject).
        todo = [p for p in paths if (kind, str(p)) not in self._cache]
        if todo:
            embs = scorer.image_embeds([load_image(p, case_id) for p in todo])
            for p, e in zip(todo, embs):
                self._cache[(kind, str(p))] = e
        return torch.stack([self._cache[(kind, str(p))] for p in paths])

    def _reference_faces(self, case: EvalCase) -> tuple[list[dict], list[np.ndarray | None]]:
        info, embs = [], []
        for k, p in enumerate(case.references):
            key = ("face", str(p))
            if key not in self._cache:
                faces, emb = self.face_analyzer.faces(load_image(p, case.id), is_reference=True)
                self._cache[key] = (faces[0] if faces else None, emb[0] if len(emb) else None)
            face, emb = self._cache[key]
            # A reference without a face (a dog, a hat) simply has no identity to compare.
            info.append(
                {"ref": k, "has_face": face is not None, "score": None if face is None else face.score}
            )
            embs.append(emb)
        return info, embs

    def _objects(self, case: EvalCase, image: Image.Image, ref_embs: torch.Tensor) -> list[dict]:
        phrases = case.object_phrases()
        out: list[dict | None] = [None] * len(phrases)
        by_phrase: dict[str, list[int]] = {}
        for k, p in enumerate(phrases):
            by_phrase.setdefault(p, []).append(k)
        for phrase, refs in by_phrase.items():
            # The detector's best boxes for the phrase; when several references share a phrase
            # ("a <image> dog and a <image> dog") they take distinct boxes among the top ones,
            # paired to maximise CLIP similarity.
            dets: list[Detection] = self.detector.detect(image, phrase)[: len(refs)]
            sims = np.zeros((len(refs), len(dets)))
            if dets:
                crop_embs = self.clip.image_embeds([crop(image, d.box) for d in dets])
                sims = cosine_matrix(ref_embs[refs], crop_embs).numpy()
            matched = dict(best_assignment(sims))
            for r, k in enumerate(refs):
                j = matched.get(r)
                if j is None:
                    out[k] = {
                        "ref": k,
                        "phrase": phrase,
                        "found": False,
                        "box": None,
                        "det_score": None,
                        "clip": None,
                    }
                else:
                    d = dets[j]
                    out[k] = {"ref": k, "phrase": phrase, "found": True, "box": [round(v, 1) for v in d.box],
                              "det_score": d.score, "clip": float(sims[r, j])}  # fmt: skip
        return [o for o in out if o is not None]

    def evaluate_case(self, case: EvalCase) -> CaseScores:
        if not case.generated:
            raise EvalInputError(
                f"case {case.id!r} has no generated images: generate them or remove the case"
            )
        need = set(self.metrics)
        has_refs = bool(case.references)
        gen_images = [load_image(p, case.id) for p in case.generated]
        scores = [
            ImageScores(str(p), case.seeds[i] if case.seeds else None) for i, p in enumerate(case.generated)
        ]
        if "clip_t" in need or "clip_i" in need or "mm_clip" in need:
            gen_clip = self.clip.image_embeds(gen_images)
        if "clip_t" in need:
            text = self.clip.text_embeds([case.plain_text])
            for s, v in zip(scores, cosine_matrix(gen_clip, text)[:, 0].tolist()):
                s.clip_t = v
        subject_sets = case.subject_images or tuple((p,) for p in case.references)
        for name, scorer, gen_embs in (
            ("clip_i", self.clip, gen_clip if "clip_i" in need else None),
            ("dino", self.dino, self.dino.image_embeds(gen_images) if "dino" in need and has_refs else None),
        ):
            if name not in need or not has_refs:
                continue
            # Per reference: mean over its subject photos; then mean over references.
            per_ref = [
                cosine_matrix(gen_embs, self._embed_paths(name, scorer, ps, case.id)).mean(1)
                for ps in subject_sets
            ]
            for i, s in enumerate(scores):
                setattr(s, name, float(torch.stack([r[i] for r in per_ref]).mean()))
        if "mm_clip" in need and has_refs:
            ref_embs = self._embed_paths("clip_i", self.clip, case.references, case.id)
            for s, im in zip(scores, gen_images):
                s.objects = self._objects(case, im, ref_embs)
                s.mm_clip = _mean([o["clip"] for o in s.objects])
        ref_face_info: list[dict] = []
        if "face" in need and has_refs:
            ref_face_info, ref_face_embs = self._reference_faces(case)
            with_face = [k for k, e in enumerate(ref_face_embs) if e is not None]
            for s, im in zip(scores, gen_images):
                faces, embs = self.face_analyzer.faces(im)
                s.generated_faces = len(faces)
                if not with_face:
                    continue
                sims = (
                    np.stack([ref_face_embs[k] for k in with_face]) @ embs.T
                    if len(faces)
                    else np.zeros((len(with_face), 0))
                )
                matched = dict(best_assignment(sims))
                for r, k in enumerate(with_face):
                    j = matched.get(r)
                    s.faces.append(
                        {
                            "ref": k,
                            "found": j is not None,
                            "sim": None if j is None else float(sims[r, j]),
                            "box": None if j is None else [round(v, 1) for v in faces[j].box],
                        }
                    )
                s.face = _mean([f["sim"] for f in s.faces])
        return CaseScores(case, scores, ref_face_info)

    def evaluate(self, manifest: Manifest, progress: bool = True) -> list[CaseScores]:
        if "mm_clip" in self.metrics:
            for c in manifest.cases:
                c.object_phrases()  # fail before loading images, not after hours of scoring
        return [self.evaluate_case(c) for c in tqdm(manifest.cases, desc="evaluating", disable=not progress)]
