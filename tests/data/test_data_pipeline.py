"""End to end: sources -> rules -> shards, resuming, corrupt input, head crops, CLI, contact sheet."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from data_fixtures import jpeg_bytes, synth_image
from PIL import Image

from mumu_core.data import (
    BootstrapConfig,
    FolderSource,
    KnownBoxesSource,
    Models,
    ParquetSource,
    WebDatasetSource,
    bootstrap,
    read_shard,
)
from mumu_core.data.__main__ import main as cli
from mumu_core.data.contact_sheet import contact_sheet
from mumu_core.data.pipeline import process_part

SMALL = {"min_crop_side": 20, "controls": ("canny", "sketch")}


def scene(seed: int = 0) -> dict:
    return {
        "image": synth_image(200, 160, seed),
        "caption": "a man and his dog near a tree",
        "objects": [
            {
                "phrase": "man",
                "span": [2, 5],
                "box": [10, 10, 90, 150],
                "is_person": True,
                "head_box": [30, 12, 60, 40],
            },
            {"phrase": "dog", "span": [14, 17], "box": [100, 80, 180, 150], "label": "dog", "score": 0.8},
            {"phrase": "tree", "span": [25, 29], "box": [150, 0, 160, 50]},  # 10 px wide: too small
        ],
    }


def samples(out) -> list[dict]:
    got = []
    for p in sorted(out.glob("shard-*.tar")):
        got.extend(read_shard(p))
    return got


def test_known_boxes_record_exactly(tmp_path):
    src = KnownBoxesSource([scene(0), scene(1)], images_per_part=1)
    man = bootstrap(src, tmp_path / "out", BootstrapConfig(**SMALL), progress=False)
    assert man["parts"] == {"total": 2, "finished": 2, "skipped_as_finished": 0, "failed": []}
    assert man["counts"]["images_out"] == 2 and man["counts"]["head_crops"] == 2
    assert man["filter"] == {
        "kept": 4,
        "below_threshold": 0,
        "too_small": 2,
        "too_large": 0,
        "duplicate": 0,
        "over_limit": 0,
    }
    s = samples(tmp_path / "out")
    assert [x["__key__"] for x in s] == ["s000000-000000", "s000001-000000"]
    assert set(s[0]) == {
        "__key__",
        "jpg",
        "json",
        "crop0.png",
        "crop1.png",
        "head0.png",
        "canny.png",
        "sketch.png",
    }
    rec = json.loads(s[0]["json"])
    assert rec["key"] == "s000000-000000" and rec["caption"] == "a man and his dog near a tree"
    assert (rec["width"], rec["height"]) == (200, 160)
    man_o, dog_o, tree_o = rec["objects"]
    assert man_o == {
        "phrase": "man",
        "span": [2, 5],
        "box": [10, 10, 90, 150],
        "score": 1.0,
        "label": "man",
        "is_person": True,
        "crop": "crop0.png",
        "head_crop": "head0.png",
        "head_box": [30, 12, 60, 40],
        "kept": True,
        "reason": None,
    }
    assert (
        dog_o["kept"]
        and dog_o["crop"] == "crop1.png"
        and dog_o["head_crop"] is None
        and dog_o["score"] == 0.8
    )
    assert tree_o["reason"] == "too_small" and tree_o["crop"] is None and not tree_o["kept"]
    assert rec["controls"] == {"canny": "canny.png", "sketch": "sketch.png"}
    assert rec["prompt"] == [
        {"text": "a "},
        {"image": "crop0.png", "object": 0},
        {"text": "man and his "},
        {"image": "crop1.png", "object": 1},
        {"text": "dog near a tree"},
    ]
    # crops are exactly the boxed pixels of the stored image (PNG source -> lossless crop)
    src_img = scene(0)["image"]
    crop = Image.open(io.BytesIO(s[0]["crop0.png"]))
    assert crop.size == (80, 140)
    assert np.array_equal(np.asarray(crop), np.asarray(src_img.crop((10, 10, 90, 150))))
    assert Image.open(io.BytesIO(s[0]["head0.png"])).size == (30, 28)
    assert Image.open(io.BytesIO(s[0]["canny.png"])).size == (200, 160)


def test_known_boxes_validation_names_the_record():
    bad = scene()
    bad["objects"][0]["span"] = [0, 3]
    with pytest.raises(ValueError, match="record 0 object 0: span"):
        KnownBoxesSource([bad])
    with pytest.raises(ValueError, match="record 0: needs 'image'"):
        KnownBoxesSource([{"caption": "x"}])


def test_atomic_output_resume_and_config_guard(tmp_path):
    out = tmp_path / "out"
    src = KnownBoxesSource([scene(i) for i in range(3)], images_per_part=1)
    cfg = BootstrapConfig(**SMALL)
    bootstrap(src, out, cfg, progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "manifest.json",
        "shard-000000.json",
        "shard-000000.tar",
        "shard-000001.json",
        "shard-000001.tar",
        "shard-000002.json",
        "shard-000002.tar",
    ]  # no temp files left behind
    first = (out / "shard-000001.tar").read_bytes()
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    # an interrupted run: part 1's shard written but not its stats marker; part 2 never started
    (out / "shard-000001.json").unlink()
    (out / "shard-000002.tar").unlink()
    (out / "shard-000002.json").unlink()
    man = bootstrap(src, out, cfg, progress=False)
    assert man["parts"]["skipped_as_finished"] == 1 and man["parts"]["finished"] == 3
    assert man["counts"]["images_out"] == 3  # the manifest counts earlier runs' parts too
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime  # finished part not rewritten
    assert (out / "shard-000001.tar").read_bytes() == first  # deterministic shard bytes
    with pytest.raises(ValueError, match="made with another config"):
        bootstrap(src, out, BootstrapConfig(min_crop_side=21, controls=("canny",)), progress=False)


def test_write_failure_leaves_no_partial_shard(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    src = KnownBoxesSource([scene(0)])
    import mumu_core.data.shards as shards

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        process_part(src, 0, out, BootstrapConfig(**SMALL).validate(), Models())
    assert list(out.iterdir()) == []  # neither a shard nor a temp file


def _wds(path, entries):
    with tarfile.open(path, "w") as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_corrupt_inputs_are_logged_and_skipped(tmp_path, tiny_gdino, image_folder):
    cfg = BootstrapConfig(detector_path=str(tiny_gdino), min_crop_side=1, box_threshold=0.0, batch_size=2)
    # folder: 4 good, 1 corrupt jpeg, 1 image without caption
    man = bootstrap(FolderSource(image_folder), tmp_path / "f", cfg, progress=False)
    assert man["counts"]["images_in"] == 6 and man["counts"]["images_out"] == 4
    errs = {e["source_key"]: e["error"] for e in man["errors"]}
    assert set(errs) == {"img4.jpg", "img5.png"}
    assert errs["img4.jpg"].startswith("bad image") and "no caption file" in errs["img5.png"]
    keys = [s["__key__"] for s in samples(tmp_path / "f")]
    assert keys == ["s000000-000000", "s000000-000001", "s000000-000002", "s000000-000003"]
    # webdataset: a good shard, a truncated shard (its readable samples survive), garbage
    wds = tmp_path / "wds"
    wds.mkdir()
    good = [
        ("000.jpg", jpeg_bytes(synth_image(120, 90, 1))),
        ("000.txt", b"a dog"),
        ("001.jpg", jpeg_bytes(synth_image(90, 120, 2))),
        ("001.json", json.dumps({"caption": "a red car"}).encode()),
    ]
    _wds(wds / "a.tar", good)
    _wds(wds / "b.tar", good + [("002.jpg", jpeg_bytes(synth_image(99, 99, 3))), ("002.txt", b"a cat")])
    raw = (wds / "b.tar").read_bytes()
    (wds / "b.tar").write_bytes(raw[: len(raw) // 2 + 700])
    (wds / "c.tar").write_bytes(b"not a tar at all" * 100)
    man = bootstrap(WebDatasetSource(wds), tmp_path / "w", cfg, progress=False)
    assert man["parts"]["finished"] == 3 and not man["parts"]["failed"]
    recs = [json.loads(s["json"]) for s in samples(tmp_path / "w")]
    assert [(r["key"], r["source_key"], r["caption"]) for r in recs[:2]] == [
        ("s000000-000000", "000", "a dog"),
        ("s000000-000001", "001", "a red car"),
    ]
    assert any("corrupt tar" in e["error"] for e in man["errors"])
    assert 2 <= len(recs) <= 4


def test_detector_path_heads_and_depth(tmp_path, tiny_gdino, tiny_depth, image_folder):
    cfg = BootstrapConfig(
        detector_path=str(tiny_gdino),
        depth_path=str(tiny_depth),
        controls=("canny", "depth", "sketch"),
        min_crop_side=1,
        max_crop_area_frac=1.0,
        box_threshold=0.0,
        head_threshold=0.0,
        head_min_side=1,
        duplicate_iou=1.0,
        batch_size=3,
    )
    man = bootstrap(FolderSource(image_folder), tmp_path / "out", cfg, progress=False)
    recs = {json.loads(s["json"])["caption"]: s for s in samples(tmp_path / "out")}
    s = recs["a man and his dog"]
    rec = json.loads(s["json"])
    assert [(o["phrase"], o["span"]) for o in rec["objects"]] == [("man", [2, 5]), ("dog", [14, 17])]
    man_o = rec["objects"][0]
    assert man_o["is_person"] and man_o["kept"] and not rec["objects"][1]["is_person"]
    # a random model's head box may be a sliver; when one is stored it lies inside the person box
    if man_o["head_crop"] is not None:
        hb, b = man_o["head_box"], man_o["box"]
        assert b[0] <= hb[0] <= hb[2] <= b[2] and b[1] <= hb[1] <= hb[3] <= b[3]
        assert Image.open(io.BytesIO(s[man_o["head_crop"]])).size == (hb[2] - hb[0], hb[3] - hb[1])
    assert rec["boxes_from"] == "detector" and rec["controls"]["depth"] == "depth.png"
    assert Image.open(io.BytesIO(s["depth.png"])).size == (rec["width"], rec["height"])
    assert man["counts"]["person_objects"] == 2  # "man" and "woman"


class FakeDetector:
    """Deterministic stand-in with GroundingDinoDetector's detect() contract."""

    def __init__(self, head_score: float = 0.9):
        self.head_score = head_score
        self.calls: list[list[list[str]]] = []

    def detect(self, images, phrase_lists):
        self.calls.append([list(p) for p in phrase_lists])
        boxes = {"man": [20.4, 10, 120, 150], "dog": [130, 60, 190, 150], "head": [10, 5, 40, 35]}
        return [
            [(boxes[p], self.head_score if p == "head" else 0.8) if p in boxes else None for p in phrases]
            for phrases in phrase_lists
        ]


def test_head_crops_from_the_detector_inside_the_person_box(tmp_path):
    from mumu_core.data import SourceItem, bootstrap_batch

    item = SourceItem("k", jpeg_bytes(synth_image(200, 160, 0)), "a man and his dog")
    cfg = BootstrapConfig(min_crop_side=20, controls=()).validate()
    det = FakeDetector()
    (sample,), stats = bootstrap_batch([("s000000-000000", item)], cfg, Models(detector=det))
    assert det.calls == [[["man", "dog"]], [["head"]]]  # one batched call for phrases, one for heads
    man_o, dog_o = sample.record["objects"]
    assert man_o["box"] == [20, 10, 120, 150]  # rounded detector box
    assert man_o["head_box"] == [30, 15, 60, 45]  # head box in crop pixels + the person box's corner
    assert man_o["head_crop"] == "head0.png" and dog_o["head_crop"] is None and dog_o["head_box"] is None
    assert Image.open(io.BytesIO(sample.files["head0.png"])).size == (30, 30)
    assert stats["head_crops"] == 1 and stats["person_objects"] == 1
    # below head_threshold: no head crop, the person crop stays
    (sample,), _ = bootstrap_batch([("s000000-000000", item)], cfg, Models(detector=FakeDetector(0.1)))
    assert sample.record["objects"][0]["head_crop"] is None and sample.record["objects"][0]["kept"]
    # head detection off: the detector is called once
    det = FakeDetector()
    off = BootstrapConfig(min_crop_side=20, controls=(), head_detection=False).validate()
    bootstrap_batch([("s000000-000000", item)], off, Models(detector=det))
    assert len(det.calls) == 1


def test_missing_detector_is_a_clear_error(tmp_path, image_folder):
    with pytest.raises(ValueError, match="needs a detector: pass --detector"):
        bootstrap(FolderSource(image_folder), tmp_path / "o", BootstrapConfig(), progress=False)


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    synth_image(64, 64, 5).save(tmp_path / "img" / "p.png")
    t = pa.table(
        {
            "image": [
                {"bytes": jpeg_bytes(synth_image(80, 60, 1)), "path": None},
                {"bytes": None, "path": "img/p.png"},
                {"bytes": None, "path": "img/missing.png"},
            ],
            "caption": ["a dog", "a cat", "a lost cat"],
        }
    )
    pq.write_table(t, tmp_path / "d.parquet", row_group_size=2)
    src = ParquetSource(tmp_path / "d.parquet")
    assert src.num_parts() == 2 and src.image_column == "image" and src.caption_column == "caption"
    items = list(src.read_part(0)) + list(src.read_part(1))
    assert [i.caption for i in items] == ["a dog", "a cat", None]
    assert items[2].error.startswith("cannot read image") and "missing.png" in items[2].error
    assert items[1].image_bytes == (tmp_path / "img" / "p.png").read_bytes()
    with pytest.raises(ValueError, match="no caption column"):
        pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "bad.parquet")
        ParquetSource(tmp_path / "bad.parquet")


def test_coco_loader(tmp_path):
    synth_image(300, 200, 1).save(tmp_path / "1.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 300, "height": 200}],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}, {"id": 2, "name": "umbrella"}],
        "annotations": [
            {"image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 50], "iscrowd": 0},
            {
                "image_id": 1,
                "category_id": 1,
                "bbox": [150, 20, 120, 170],
                "iscrowd": 0,
                "keypoints": [200, 40, 2, 195, 35, 2, 205, 35, 2, 0, 0, 0, 0, 0, 0],
            },
            {"image_id": 1, "category_id": 1, "bbox": [0, 0, 300, 200], "iscrowd": 1},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    src = KnownBoxesSource.from_coco(tmp_path / "ann.json", tmp_path)
    (item,) = list(src.read_part(0))
    assert item.caption == "a person and an umbrella"
    person, umbrella = item.objects
    assert person["span"] == [2, 8] and person["box"] == [150, 20, 270, 190] and person["is_person"]
    assert person["head_box"] == pytest.approx([191, 28.5, 209, 46.5])  # face keypoints, squared, x1.8
    assert umbrella["span"] == [16, 24] and umbrella["head_box"] is None and not umbrella["is_person"]


def test_cli_bootstrap_and_contact_sheet(tmp_path, tiny_gdino, image_folder, capsys):
    out = tmp_path / "out"
    rc = cli(
        ["bootstrap", "--input", str(image_folder), "--out", str(out), "--detector", str(tiny_gdino)]
        + ["--min-crop-side", "1", "--box-threshold", "0", "--no-progress", "--batch-size", "4"]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images_out"] == 4 and summary["images_skipped"] == 2
    assert cli(["bootstrap", "--input", str(image_folder), "--out", str(tmp_path / "x")]) == 2
    assert "needs a detector" in capsys.readouterr().err
    png, html = tmp_path / "sheet.png", tmp_path / "sheet.html"
    assert (
        cli(["contact-sheet", "--shards", str(out), "--out", str(png), "--html", str(html), "-n", "3"]) == 0
    )
    sheet = Image.open(png)
    assert sheet.width == 1400 and sheet.height > 3 * 100
    page = html.read_text()
    assert page.count("<section>") == 3 and "data:image/png;base64," in page
    with pytest.raises(FileNotFoundError, match="no samples"):
        contact_sheet(tmp_path / "empty", tmp_path / "e.png")


def test_over_limit_objects_keep_their_crops_but_not_the_prompt(tmp_path):
    caption = "a b c d e"
    objs = [
        {
            "phrase": ch,
            "span": [i * 2, i * 2 + 1],
            "box": [i * 40, 0, i * 40 + 30, 30],
            "score": 0.5 + 0.1 * i,
        }
        for i, ch in enumerate("abcde")
    ]
    src = KnownBoxesSource([{"image": synth_image(200, 60, 0), "caption": caption, "objects": objs}])
    bootstrap(src, tmp_path / "o", BootstrapConfig(min_crop_side=30, controls=()), progress=False)
    (s,) = samples(tmp_path / "o")
    rec = json.loads(s["json"])
    assert [(o["kept"], o["reason"], o["crop"]) for o in rec["objects"]] == [
        (False, "over_limit", "crop0.png"),
        (False, "over_limit", "crop1.png"),
        (True, None, "crop2.png"),
        (True, None, "crop3.png"),
        (True, None, "crop4.png"),
    ]
    assert all(f"crop{i}.png" in s for i in range(5))
    assert [seg["object"] for seg in rec["prompt"] if "image" in seg] == [2, 3, 4]
    assert rec["controls"] == {} and "canny.png" not in s


class _FailingSource(KnownBoxesSource):
    def read_part(self, index):
        if index == 1:
            yield from super().read_part(index)
            raise RuntimeError("network filesystem went away")
        yield from super().read_part(index)


def test_a_failing_part_is_reported_and_the_job_goes_on(tmp_path):
    src = _FailingSource([scene(0), scene(1), scene(2)], images_per_part=1)
    out = tmp_path / "o"
    man = bootstrap(src, out, BootstrapConfig(**SMALL), progress=False)
    assert man["parts"]["finished"] == 2
    assert man["parts"]["failed"] == [{"part": 1, "error": "RuntimeError: network filesystem went away"}]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.json",
        "shard-000000.tar",
        "shard-000002.json",
        "shard-000002.tar",
    ]
    # the next run retries only the failed part
    man = bootstrap(
        KnownBoxesSource([scene(0), scene(1), scene(2)], images_per_part=1),
        out,
        BootstrapConfig(**SMALL),
        progress=False,
    )
    assert (
        man["parts"]["skipped_as_finished"] == 2
        and man["parts"]["finished"] == 3
        and not man["parts"]["failed"]
    )
