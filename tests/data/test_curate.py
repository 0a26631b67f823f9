"""curate end to end on tiny random models: every reason, model filters by score, crops, captions,
inputs (folder / img2dataset tars / parquet of paths), kill and resume, the CLI."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from curate_fixtures import SMALL_RULES, bad_images, photos, write_folder
from PIL import Image

from mumu_core.data import FolderSource, WebDatasetSource, read_shard
from mumu_core.data.__main__ import main as cli
from mumu_core.data.curate import REASONS, CurateConfig, CurateModels, curate
from mumu_core.data.filters import ImageClassifier, PeopleDetector, decode_photo
from mumu_core.data.sources import ParquetSource


def config(models, **kw) -> CurateConfig:
    base = dict(
        sfw_model=str(models["sfw"]),
        watermark_model=str(models["watermark"]),
        people_model=str(models["people"]),
        caption_model=str(models["llava"]),
        caption_max_tokens=6,
        batch_size=4,
        device="cpu",
        **SMALL_RULES,
    )
    return CurateConfig(**{**base, **kw})


def kept(out) -> list[dict]:
    got = []
    for p in sorted(out.glob("shard-*.tar")):
        got.extend(read_shard(p))
    return got


def test_bad_images_skip_with_their_reason(tiny_curate, tmp_path):
    items = bad_images()
    src = FolderSource(write_folder(tmp_path / "in", items), images_per_part=5, captions_required=False)
    cfg = config(tiny_curate, max_nsfw=1.0, max_watermark=1.0, people_threshold=1.0)
    man = curate(src, tmp_path / "out", cfg, progress=False)
    want = {}
    for _, reason in items.values():
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert {k: v for k, v in man["reasons"].items() if v} == want
    assert set(man["reasons"]) == set(REASONS)
    assert man["counts"] == {"images_in": len(items), "kept": 5, "dropped": len(items) - 5}
    by_source = {d["source_key"]: d["reason"] for d in man["dropped"]}
    assert by_source == {name: r for name, (_, r) in items.items() if r}
    samples = kept(tmp_path / "out")
    assert sorted(json.loads(s["json"])["source_key"] for s in samples) == sorted(
        n for n, (_, r) in items.items() if r is None
    )
    for s in samples:
        rec = json.loads(s["json"])
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (rec["width"], rec["height"])
        assert rec["width"] == rec["height"] == min(rec["source_width"], rec["source_height"])  # square crop
        assert rec["crop"]["mode"] == "centre" and rec["person"] is None and rec["filters"]["people"] == 0
        assert rec["caption"] and s["txt"].decode() == rec["caption"] and rec["original_caption"] is None
        assert rec["caption_model"]["class"] == "LlavaNextForConditionalGeneration"
        assert (
            rec["caption_model"]["max_new_tokens"] == 6
            and rec["caption_model"]["prompt"] == cfg.caption_prompt
        )
    rot = next(json.loads(s["json"]) for s in samples if json.loads(s["json"])["source_key"] == "rotated.jpg")
    assert (rot["source_width"], rot["source_height"]) == (320, 240)
    sheet = Image.open(man["contact_sheet"])
    assert sheet.format == "PNG" and sheet.height >= 160 * (
        1 + len(want) - 3
    )  # no thumbs for unreadable files
    # The output is a webdataset input of the bootstrap, with the new captions.
    wds = list(WebDatasetSource(tmp_path / "out").read_part(0))
    assert wds and all(i.error is None and i.caption for i in wds)


def test_model_filters_drop_by_their_scores(tiny_curate, tmp_path):
    items = photos(16)
    images = [decode_photo(d) for d, _ in items.values()]
    nsfw = ImageClassifier.from_pretrained(tiny_curate["sfw"], ["nsfw"], "sfw", "cpu").score(images)
    wm = ImageClassifier.from_pretrained(tiny_curate["watermark"], ["watermark"], "wm", "cpu").score(images)
    # The threshold that separates most images into 0 / 1 / several persons.
    det = PeopleDetector.from_pretrained(tiny_curate["people"], threshold=0.0, device="cpu")
    found = det.detect(images)
    # Thresholds half-way between measured scores: batching changes scores in the last bits.
    distinct = sorted({s for f in found for s in f.scores})
    candidates = [(a + b) / 2 for a, b in zip(distinct, distinct[1:], strict=False)]

    def counts(t):
        return [sum(s > t for s in f.scores) for f in found]

    def spread(t):  # how well t splits the images into 0 / 1 / several persons
        c = [min(n, 2) for n in counts(t)]
        return (len(set(c)), min(c.count(1), c.count(2)))

    t_people = max(candidates, key=spread)
    top = sorted(nsfw)
    t_nsfw = (top[-1] + top[-2]) / 2  # the classifiers each drop their top image
    top = sorted(w for w, n in zip(wm, nsfw, strict=True) if n <= t_nsfw)
    t_wm = (top[-1] + top[-2]) / 2
    cfg = config(tiny_curate, max_nsfw=t_nsfw, max_watermark=t_wm, people_threshold=t_people)
    man = curate(
        FolderSource(write_folder(tmp_path / "in", items), captions_required=False),
        tmp_path / "out",
        cfg,
        progress=False,
    )
    names = list(items)
    want: dict[str, str] = {}
    for i, n in enumerate(names):
        if nsfw[i] > t_nsfw:
            want[n] = "nsfw"
        elif wm[i] > t_wm:
            want[n] = "watermark"
        elif counts(t_people)[i] > 1:
            want[n] = "people"
    assert {d["source_key"]: d["reason"] for d in man["dropped"]} == want
    assert {"nsfw", "watermark", "people"} <= set(want.values()), "each model filter removes something"
    for d in man["dropped"]:
        i = names.index(d["source_key"])
        score = {"nsfw": nsfw[i], "watermark": wm[i], "people": counts(t_people)[i]}[d["reason"]]
        assert d["score"] == pytest.approx(score, abs=1e-5)
    recs = [json.loads(s["json"]) for s in kept(tmp_path / "out")]
    assert len(recs) == len(items) - len(want)
    one = [r for r in recs if r["filters"]["people"] == 1]
    assert one, "some kept image has exactly one person"
    for r in recs:
        i = names.index(r["source_key"])
        assert r["filters"]["nsfw"] == pytest.approx(nsfw[i], abs=1e-5)
        if r["filters"]["people"] == 1:
            best = found[i].boxes[counts(t_people)[i] and 0]
            assert r["crop"]["mode"] == "person" and r["person"]["box_in_source"] == pytest.approx(
                best, abs=0.06
            )
            x0, y0, x1, y1 = r["crop"]["box"]
            cx = (best[0] + best[2]) / 2
            # Centred on the person as far as the image allows.
            assert abs((x0 + x1) / 2 - cx) < 1 or x0 == 0 or x1 == r["source_width"]
            assert r["person"]["inside_crop"] and r["person"]["box"] == pytest.approx(
                [best[0] - x0, best[1] - y0, best[2] - x0, best[3] - y0], abs=0.06
            )
        else:
            assert r["crop"]["mode"] == "centre" and r["person"] is None


def _interrupt_after(n_parts):
    seen = []

    def hook(stats):
        seen.append(stats["part"])
        if len(seen) == n_parts:
            raise KeyboardInterrupt

    return hook


class _CaptionerKilledOnCall:
    """Wraps the captioner; its n-th call raises KeyboardInterrupt (a kill in the middle of a part)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.calls, self.identity = inner, n, 0, inner.identity

    def caption(self, images):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.caption(images)


def test_kill_and_resume_loses_and_duplicates_nothing(tiny_curate, tmp_path):
    folder = write_folder(tmp_path / "in", photos(7))
    cfg = config(
        tiny_curate, max_nsfw=1.0, max_watermark=1.0, people_threshold=1.0, batch_size=2, images_per_part=3
    )
    src = FolderSource(folder, images_per_part=3, captions_required=False)
    models = CurateModels.load(cfg)
    ref = curate(src, tmp_path / "ref", cfg, progress=False, models=models, sheet=False)
    assert ref["parts"]["finished"] == 3 and ref["counts"]["kept"] == 7

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        curate(src, out, cfg, progress=False, models=models, on_part=_interrupt_after(1), sheet=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    # Killed in the middle of part 1 (its second batch): nothing of part 1 is published.
    killer = CurateModels(
        models.sfw, models.watermark, models.people, _CaptionerKilledOnCall(models.captioner, 2)
    )
    with pytest.raises(KeyboardInterrupt):
        curate(src, out, cfg, progress=False, models=killer, sheet=False)
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    stale = out / ".shard-000001.tar.tmp-999999999-deadbeef"  # left by a SIGKILL (no such process)
    stale.write_bytes(b"partial")

    man = curate(src, out, cfg, progress=False, models=models, sheet=False)
    assert man["parts"] == {"total": 3, "finished": 3, "skipped_as_finished": 1, "unfinished": []}
    assert not stale.exists() and not list(out.glob(".*tmp*"))
    assert man["counts"] == ref["counts"] and man["reasons"] == ref["reasons"]
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    keys = [s["__key__"] for s in kept(out)]
    assert len(keys) == len(set(keys)) == 7
    assert sorted(json.loads(s["json"])["source_key"] for s in kept(out)) == sorted(
        p.name for p in folder.glob("*.jpg")
    )
    # Resuming with other rules is refused instead of mixing two datasets.
    with pytest.raises(ValueError, match="another config"):
        curate(src, out, config(tiny_curate, max_nsfw=0.9, images_per_part=3), progress=False, models=models)


def _img2dataset_tar(path, items):
    with tarfile.open(path, "w") as tf:
        for i, (name, (data, _)) in enumerate(items.items()):
            key = f"{i:09d}"
            members = {
                "json": json.dumps(
                    {"url": f"https://example.com/{name}", "caption": f"photo {i}", "key": key}
                ).encode()
            }
            if i != 1:  # sample 1 lost its image in the download
                members["jpg"] = data
            members["txt"] = f"photo {i}".encode()
            for ext, blob in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))


def test_img2dataset_tars_and_parquet_of_paths(tiny_curate, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = photos(3)
    _img2dataset_tar(tmp_path / "00000.tar", items)
    cfg = config(tiny_curate, max_nsfw=1.0, max_watermark=1.0, people_threshold=1.0, caption=False)
    man = curate(
        WebDatasetSource(tmp_path / "00000.tar", captions_required=False),
        tmp_path / "out",
        cfg,
        progress=False,
    )
    assert man["counts"]["kept"] == 2 and man["reasons"]["read_error"] == 1
    recs = [json.loads(s["json"]) for s in kept(tmp_path / "out")]
    assert [r["source_meta"]["url"] for r in recs] == [
        "https://example.com/photo000.jpg",
        "https://example.com/photo002.jpg",
    ]
    assert [r["caption"] for r in recs] == ["photo 0", "photo 2"] and recs[0]["caption_model"] is None

    folder = write_folder(tmp_path / "imgs", items)
    pq.write_table(pa.table({"path": sorted(p.name for p in folder.glob("*.jpg"))}), folder / "list.parquet")
    man = curate(
        ParquetSource(folder / "list.parquet", captions_required=False),
        tmp_path / "pq",
        config(tiny_curate, max_nsfw=1.0, max_watermark=1.0, people_threshold=1.0),
        progress=False,
    )
    assert man["counts"] == {"images_in": 3, "kept": 3, "dropped": 0}
    # Captioning off and no source caption: dropped with its reason.
    man = curate(FolderSource(folder, captions_required=False), tmp_path / "nocap", cfg, progress=False)
    assert man["reasons"]["no_caption"] == 3


def test_cli_errors_before_work_and_a_run(tiny_curate, tmp_path, capsys):
    folder = write_folder(tmp_path / "in", photos(2), captions=True)
    out = tmp_path / "out"
    assert cli(["curate", "--input", str(folder), "--out", str(out)]) == 2
    assert "pass --sfw-model DIR" in capsys.readouterr().err and not out.exists()
    missing = tmp_path / "nowhere"
    assert cli(["curate", "--input", str(folder), "--out", str(out), "--sfw-model", str(missing), "--no-watermark",
                "--no-people", "--no-caption"]) == 2  # fmt: skip
    assert str(missing) in capsys.readouterr().err and not out.exists()
    assert cli(["curate", "--input", str(folder), "--out", str(out), "--no-sfw", "--no-watermark", "--no-caption",
                "--people-model", str(tiny_curate["sfw"])]) == 2  # fmt: skip
    assert "people detector" in capsys.readouterr().err  # a classifier is no detector: its labels say so
    rc = cli(["curate", "--input", str(folder), "--out", str(out), "--no-sfw", "--no-watermark", "--no-people",
              "--no-caption", "--min-short-side", "64", "--min-megapixels", "0", "--aspect-buckets", "1,4:3",
              "--no-progress"])  # fmt: skip
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kept"] == 2
    recs = [json.loads(s["json"]) for s in kept(out)]
    assert all(r["caption"] == r["original_caption"] == "a man in a red coat" for r in recs)
    assert {(r["width"], r["height"]) for r in recs} == {(160, 120), (171, 128)}  # nearest bucket: 4:3
    assert (out / "manifest.json").is_file() and (out / "contact_sheet.png").is_file()
