"""Synthetic data (issue 15): prompts -> synth (SDXL + PickScore) -> score, on tiny random models of the
real classes (mumu_core.testing builds them: SDXL with its two CLIP text encoders, a CLIPModel for
PickScore, a Llama causal LM with a chat template)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mumu_core.data.__main__ import main as data_main
from mumu_core.data.llm import InstructLLM, extract_content_style, generate_items, parse_json_answer
from mumu_core.data.pickscore import PickScorer, ScorerLoadError
from mumu_core.data.prompts import (
    PromptsConfig,
    PromptSetError,
    build_prompt_set,
    dedup_key,
    normalise,
    pair,
    read_table,
    starter_lists,
    write_table,
)
from mumu_core.data.shards import read_shard
from mumu_core.data.synth import SynthConfig, SynthModels, buckets, prompt_seed, synth

ROOT = Path(__file__).parents[2]


def small_table(path: Path, n_contents: int = 3, k: int = 2) -> Path:
    contents = ["a man and his dog", "a woman with a cat", "a red car on a bench", "a boy with a ball"]
    rows = pair(
        contents[:n_contents], ["oil painting, warm", "pencil sketch", "pixel art, 16-bit"], k, seed=0
    )
    return write_table(rows, path)


def tiny_cfg(tm, **kw) -> SynthConfig:
    base = dict(sdxl=str(tm.sdxl), pickscore=str(tm.pickscore), min_pickscore=-1000.0, steps=2,
                prompts_per_shard=2, batch_size=2)  # fmt: skip
    base.update(kw)
    return SynthConfig(**base)


@pytest.fixture(scope="module")
def models(tiny_models):
    return SynthModels.load(tiny_cfg(tiny_models))


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder nobody may write: chmod 555, or (root ignores modes) /sys, a read-only mount."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        yield ro
    finally:
        ro.chmod(0o755)


def keys_of(out: Path) -> list[str]:
    return [s["__key__"] for p in sorted(out.glob("shard-*.tar")) for s in read_shard(p)]


# -- prompts ----------------------------------------------------------------------------------------


def test_starter_lists_pairing_and_normalisation():
    contents, styles = starter_lists()
    assert len({dedup_key(c) for c in contents}) >= 300 and len({dedup_key(s) for s in styles}) >= 150
    rows, stats = build_prompt_set(PromptsConfig(styles_per_content=3, seed=1))
    assert stats["contents"]["starter"] >= 300 and stats["styles"]["starter"] >= 150
    assert len(rows) == 3 * stats["contents"]["total"] == stats["prompts"]
    assert len({r["id"] for r in rows}) == len(rows)
    by_content: dict[str, set] = {}
    for r in rows:
        assert r["caption"] == f"{r['content']}, {r['style']}"
        by_content.setdefault(r["content"], set()).add(r["style"])
    assert all(len(s) == 3 for s in by_content.values())  # K distinct styles each
    again, _ = build_prompt_set(PromptsConfig(styles_per_content=3, seed=1))
    other, _ = build_prompt_set(PromptsConfig(styles_per_content=3, seed=2))
    assert again == rows and other != rows
    # A content's styles depend on (seed, content) only: more contents change nothing for the others.
    a = pair(["x dog", "y cat"], [f"s{i}" for i in range(20)], 3, 5)
    b = pair(["x dog", "z cow", "y cat"], [f"s{i}" for i in range(20)], 3, 5)
    styles_of = lambda rs, c: [r["style"] for r in rs if r["content"] == c]  # noqa: E731
    assert styles_of(a, "y cat") == styles_of(b, "y cat")
    assert normalise('  "A man,  and his dog."  ') == "A man, and his dog"
    assert dedup_key("A man, and his DOG!") == dedup_key("a man and his dog")
    with pytest.raises(PromptSetError, match="only 2 styles"):
        pair(["a"], ["s1", "s2"], 3, 0)


class CannedLLM(InstructLLM):
    """An LLM whose answers are given (what a real model may say, garbage included)."""

    def __init__(self, answers):
        self.answers = list(answers)

    def chat(self, conversations, prefill="", sample=False, seed=0):
        return [self.answers[i % len(self.answers)] for i in range(len(conversations))]


def test_llm_answers_are_validated_and_garbage_is_counted():
    answers = [
        '{"content": "a knight on a horse", "style": "oil painting"}',
        'Sure! {"content": "a dog", "style": ""} hope this helps',  # empty style: content only
        "I cannot help with that",
        '{"content": "a cat"',  # truncated
        '{"content": 3, "style": "x"}',
        '{"style": "only style"}',
        '["a list"]',
    ]
    good, bad = extract_content_style(CannedLLM(answers), ["p"] * len(answers))
    assert [g["content"] for g in good] == ["a knight on a horse", "a dog"] and len(bad) == 5
    assert parse_json_answer('{"content": "' + "x" * 400 + '", "style": ""}', ("content", "style")) is None
    items, bad = generate_items(CannedLLM(['{"style": "ink wash"}', "nonsense"]), "style", 4, ["a", "b"])
    assert items == ["ink wash", "ink wash"] and len(bad) == 2


def test_prompts_cli_with_the_tiny_llm(tiny_models, tmp_path, capsys):
    table = tmp_path / "diffusiondb.csv"
    table.write_text('prompt,seed\n"a cat on a sofa, oil painting",1\na dog,2\na dog,3\n')
    out = tmp_path / "p.parquet"
    rc = data_main(["prompts", "--out", str(out), "--styles-per-content", "2", "--extract-from", str(table),
                    "--llm", str(tiny_models.llm), "--generate-styles", "3", "--max-new-tokens", "12"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    stats = json.loads((tmp_path / "p.stats.json").read_text())
    # A random model writes garbage: every answer is malformed, counted, skipped.
    assert stats["llm"]["source_prompts"] == 2 and stats["llm"]["answers"] == 5
    assert stats["llm"]["malformed"] == 5 and stats["contents"]["extracted"] == 0
    rows = read_table(out)
    assert len(rows) == 2 * stats["contents"]["total"] and rows[0]["id"] == "p00000000"


def test_prompts_bad_input_fails_before_work(tiny_models, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt\n")
    out = tmp_path / "p.jsonl"
    args = ["prompts", "--out", str(out), "--extract-from", str(empty), "--llm", str(tiny_models.llm)]
    assert data_main(args) == 2 and "no non-empty prompts" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"prompt": "a dog"}\n')
    assert (
        data_main(["prompts", "--out", str(out), "--extract-from", str(ok), "--llm", str(tmp_path / "nope")])
        == 2
    )
    assert "nope has no config.json" in capsys.readouterr().err
    assert (
        data_main(
            ["prompts", "--out", str(out), "--extract-from", str(ok), "--llm", str(tiny_models.pickscore)]
        )
        == 2
    )
    assert "not a causal LM" in capsys.readouterr().err
    assert not out.exists()
    out.write_text("precious\n")
    assert data_main(["prompts", "--out", str(out)]) == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "precious\n"
    with read_only_folder(tmp_path) as ro:
        assert data_main(["prompts", "--out", str(ro / "p.jsonl")]) == 2
        assert "not writable" in capsys.readouterr().err


# -- PickScore --------------------------------------------------------------------------------------


def test_pickscore_is_scaled_cosine(tiny_models):
    scorer = PickScorer.from_pretrained(tiny_models.pickscore)
    images = [Image.new("RGB", (40, 30), (200, 20, 20)), Image.new("RGB", (24, 36), (10, 200, 30))]
    prompts = ["a red car", "a green tree in a field, oil painting"]
    got = scorer.score(images, prompts)
    inputs = scorer.processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = scorer.model(**inputs).logits_per_image  # exp(logit_scale) * cosine, all pairs
    assert got == pytest.approx(torch.diagonal(logits).tolist(), abs=1e-4)
    assert abs(scorer.model.logit_scale.exp().item() - 100.0) < 1e-3
    with pytest.raises(ScorerLoadError, match="not a CLIP model"):
        PickScorer.from_pretrained(tiny_models.llm)
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, prompts[:1])


# -- synth ------------------------------------------------------------------------------------------


def test_synth_records_seeds_buckets_threshold_and_histogram(tiny_models, models, tmp_path):
    table = small_table(tmp_path / "p.jsonl")
    rows = read_table(table)
    m = synth(table, tmp_path / "all", tiny_cfg(tiny_models, resolution=64), progress=False, models=models)
    assert m["counts"] == {"prompts": 6, "generated": 6, "kept": 6, "kept_fraction": 1.0,
                           "dropped": {"nan": 0, "black": 0, "pickscore": 0}}  # fmt: skip
    samples = {s["__key__"]: s for p in sorted((tmp_path / "all").glob("shard-*.tar")) for s in read_shard(p)}
    assert sorted(samples) == [r["id"] for r in rows]
    sizes = set(buckets(64, "sdxl"))
    for r in rows:
        rec = json.loads(samples[r["id"]]["json"])
        assert (
            rec["caption"] == r["caption"] and rec["content"] == r["content"] and rec["style"] == r["style"]
        )
        assert rec["seed"] == prompt_seed(0, r["id"]) and rec["steps"] == 2 and rec["guidance"] == 7.0
        assert rec["model"].startswith("sdxl@") and rec["pickscore_model"] == "pickscore"
        im = Image.open(io.BytesIO(samples[r["id"]]["jpg"]))
        assert (im.width, im.height) == (rec["width"], rec["height"]) and im.size in sizes
    scores = sorted(json.loads(s["json"])["pickscore"] for s in samples.values())
    # Same seeds, a threshold between the 3rd and 4th score: exactly the 3 images above it are kept.
    assert scores[2] < scores[3]
    thr = (scores[2] + scores[3]) / 2
    m2 = synth(table, tmp_path / "half", tiny_cfg(tiny_models, resolution=64, min_pickscore=thr),
               progress=False, models=models)  # fmt: skip
    assert m2["counts"]["kept"] == 3 and m2["counts"]["dropped"]["pickscore"] == 3
    assert m2["runs"][-1]["kept_fraction_of_scored"] == 0.5
    kept = {
        json.loads(s["json"])["pickscore"] for p in (tmp_path / "half").glob("*.tar") for s in read_shard(p)
    }
    assert kept == set(scores[3:])
    assert sorted(m2["pickscore"].keys()) == ["histogram", "mean", "min", "quantiles", "scored"]
    assert Image.open(tmp_path / "half" / "pickscore_hist.png").size == (720, 360)


class BrokenImages:
    """Wraps a generator: the listed prompts' images come back NaN or black (an fp16 VAE overflow)."""

    def __init__(self, gen, nan_captions, black_captions, stop_after_calls=None):
        self.gen, self.nan, self.black, self.stop, self.calls = (
            gen,
            nan_captions,
            black_captions,
            stop_after_calls,
            0,
        )
        self.identity, self.native_resolution = gen.identity, gen.native_resolution

    def generate(self, captions, seeds, w, h, steps, guidance):
        if self.stop is not None and self.calls >= self.stop:
            raise KeyboardInterrupt  # what Ctrl-C raises mid-part
        self.calls += 1
        out = self.gen.generate(captions, seeds, w, h, steps, guidance)
        for i, c in enumerate(captions):
            if c in self.nan:
                out[i, 0, 0, 0] = np.nan
            if c in self.black:
                out[i] = 0.0
        return out


def test_nan_and_black_images_are_dropped_and_counted(tiny_models, models, tmp_path):
    table = small_table(tmp_path / "p.jsonl")
    rows = read_table(table)
    broken = SynthModels(
        BrokenImages(models.generator, {rows[1]["caption"]}, {rows[4]["caption"]}), models.scorer
    )
    m = synth(table, tmp_path / "out", tiny_cfg(tiny_models), progress=False, models=broken)
    assert m["counts"]["dropped"] == {"nan": 1, "black": 1, "pickscore": 0} and m["counts"]["kept"] == 4
    assert sorted(keys_of(tmp_path / "out")) == sorted(r["id"] for i, r in enumerate(rows) if i not in (1, 4))
    assert m["pickscore"]["scored"] == 4  # dropped images are never scored


def test_interrupted_run_resumes_without_duplicates_or_losses(tiny_models, models, tmp_path):
    table = small_table(tmp_path / "p.jsonl", n_contents=4)  # 8 prompts, 4 parts of 2
    cfg = tiny_cfg(tiny_models, batch_size=1)
    ref = synth(table, tmp_path / "ref", cfg, progress=False, models=models)
    out = tmp_path / "out"
    stopping = SynthModels(BrokenImages(models.generator, set(), set(), stop_after_calls=3), models.scorer)
    with pytest.raises(KeyboardInterrupt):
        synth(table, out, cfg, progress=False, models=stopping)  # stops inside part 1
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.json", "shard-000000.tar"]
    first = (out / "shard-000000.tar").read_bytes()
    m = synth(table, out, cfg, progress=False, models=models)
    assert m["parts"]["finished"] == 4 and m["runs"][-1]["parts_done"] == 3
    assert (out / "shard-000000.tar").read_bytes() == first
    assert keys_of(out) == keys_of(tmp_path / "ref") and len(set(keys_of(out))) == 8
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert ref["counts"] == m["counts"]
    # Another config into the same folder is refused; the shards stay.
    with pytest.raises(ValueError, match="another config"):
        synth(table, out, tiny_cfg(tiny_models, batch_size=1, steps=3), progress=False, models=models)
    assert (out / "shard-000000.tar").read_bytes() == first


def _cli_synth(tm, table, out, *extra):
    return [sys.executable, "-m", "mumu_core.data", "synth", "--prompts", str(table), "--out", str(out),
            "--sdxl", str(tm.sdxl), "--pickscore", str(tm.pickscore), "--min-pickscore", "-1000",
            "--steps", "6", "--batch-size", "1", "--prompts-per-shard", "1", "--no-progress", *extra]  # fmt: skip


@pytest.mark.slow  # two fresh interpreters (torch + diffusers imports); ~20 s on an idle machine
def test_sigkill_then_resume_from_the_cli(tiny_models, tmp_path):
    table = small_table(tmp_path / "p.jsonl", n_contents=4, k=3)  # 12 prompts, 12 parts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _cli_synth(tiny_models, table, out), env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 900  # a safety net only: a loaded machine imports torch slowly
        while not (out / "shard-000001.json").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(300)
    done_before = sorted(p.name for p in out.glob("shard-*.json"))
    assert "shard-000001.json" in done_before and not (out / "manifest.json").exists()
    temps = sorted(p.name for p in out.glob(".*tmp*"))  # SIGKILL may leave the open part's temp file
    # A second run stopped by SIGTERM (what schedulers send) exits 130 and removes its own temp file.
    proc = subprocess.Popen(_cli_synth(tiny_models, table, out), env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 900  # a safety net only: a loaded machine imports torch slowly
        while len(list(out.glob("shard-*.json"))) <= len(done_before) and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    if proc.returncode == 130:  # (it may have finished all parts before the signal arrived)
        assert "run the same command again to resume" in err
    assert sorted(p.name for p in out.glob(".*tmp*")) == temps
    done_before = sorted(p.name for p in out.glob("shard-*.json"))
    res = subprocess.run(
        _cli_synth(tiny_models, table, out), env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(keys_of(out)) == [r["id"] for r in read_table(table)]  # each prompt exactly once
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 12 and manifest["runs"][-1]["parts_done"] == 12 - len(done_before)


def test_synth_bad_input_is_refused_before_work(tiny_models, tmp_path, capsys):
    table = small_table(tmp_path / "p.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    tm = tiny_models

    def run(*args):
        rc = data_main(["synth", "--out", str(out), "--steps", "1", *args])
        return rc, capsys.readouterr().err

    rc, err = run("--prompts", str(empty), "--sdxl", str(tm.sdxl), "--pickscore", str(tm.pickscore))
    assert rc == 2 and "is empty" in err
    rc, err = run("--prompts", str(table), "--sdxl", str(tmp_path / "none"), "--pickscore", str(tm.pickscore))
    assert rc == 2 and "does not exist" in err
    rc, err = run("--prompts", str(table), "--sdxl", str(tm.vlm), "--pickscore", str(tm.pickscore))
    assert rc == 2 and "no model_index.json" in err
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    rc, err = run("--prompts", str(table), "--sdxl", str(sd15), "--pickscore", str(tm.pickscore))
    assert rc == 2 and "not a StableDiffusionXLPipeline" in err
    rc, err = run(
        "--prompts", str(table), "--sdxl", str(tm.sdxl_single_file), "--pickscore", str(tm.pickscore)
    )
    assert rc == 2 and "--text-encoders" in err
    rc, err = run("--prompts", str(table), "--sdxl", str(tm.sdxl), "--pickscore", str(tm.llm))
    assert rc == 2 and "not a CLIP model" in err
    rc, err = run("--prompts", str(table), "--sdxl", str(tm.sdxl))
    assert rc == 2 and "--no-pickscore" in err
    assert not out.exists() or not any(out.iterdir())
    with read_only_folder(tmp_path) as ro:
        rc = data_main(["synth", "--prompts", str(table), "--out", str(ro / "x"), "--sdxl", str(tm.sdxl),
                        "--pickscore", str(tm.pickscore)])  # fmt: skip
        assert rc == 2 and "not writable" in capsys.readouterr().err


def test_single_file_with_text_encoders(tiny_models, tmp_path):
    table = small_table(tmp_path / "p.jsonl", n_contents=1)
    cfg = tiny_cfg(tiny_models, sdxl=str(tiny_models.sdxl_single_file), text_encoders=str(tiny_models.sdxl),
                   preset="tiny")  # fmt: skip
    m = synth(table, tmp_path / "out", cfg, progress=False)
    assert m["counts"]["kept"] == 2 and m["config"]["identity"]["sdxl"].startswith("sdxl_single@")


# -- score ------------------------------------------------------------------------------------------


def test_score_existing_shards_with_a_corrupt_one(tiny_models, models, tmp_path, capsys):
    table = small_table(tmp_path / "p.jsonl")
    synth(table, tmp_path / "gen", tiny_cfg(tiny_models, prompts_per_shard=3), progress=False, models=models)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in (tmp_path / "gen").glob("shard-*.tar"):
        (inputs / p.name).write_bytes(p.read_bytes())
    good = (inputs / "shard-000001.tar").read_bytes()
    (inputs / "shard-000001.tar").write_bytes(good[: len(good) // 2 + 100])  # truncated mid-way
    (inputs / "shard-000002.tar").write_bytes(b"this is no tar file" * 50)
    out = tmp_path / "scored"
    rc = data_main(["score", "--input", str(inputs), "--out", str(out), "--pickscore", str(tiny_models.pickscore),
                    "--min-pickscore", "-1000", "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["parts"]["finished"] == 3 and not m["parts"]["failed"]
    assert sum("corrupt tar" in e for e in m["errors"]) == 2
    assert 3 <= m["counts"]["kept"] < 6  # part 0 whole, part 1 up to the break, part 2 nothing
    orig = {s["__key__"]: json.loads(s["json"]) for s in read_shard(tmp_path / "gen" / "shard-000000.tar")}
    for s in read_shard(out / "shard-000000.tar"):
        rec = json.loads(s["json"])
        jpg = Image.open(io.BytesIO(s["jpg"]))
        assert rec["pickscore"] == pytest.approx(models.scorer.score([jpg], [rec["caption"]])[0], abs=1e-3)
        want = {k: v for k, v in orig[s["__key__"]].items() if k != "pickscore"}
        assert {k: v for k, v in rec.items() if k != "pickscore"} == want, (rec, want)
    rc = data_main(
        ["score", "--input", str(inputs), "--out", str(inputs), "--pickscore", str(tiny_models.pickscore)]
    )
    assert rc == 2 and "holds the input shards" in capsys.readouterr().err


# -- Ray --------------------------------------------------------------------------------------------


def test_synth_on_ray_with_two_workers_matches_local(tiny_models, models, tmp_path):
    ray = pytest.importorskip("ray")
    table = small_table(tmp_path / "p.jsonl")
    cfg = tiny_cfg(tiny_models)
    local = synth(table, tmp_path / "local", cfg, progress=False, models=models)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = synth(
            table, tmp_path / "ray", tiny_cfg(tiny_models), executor="ray", num_workers=2, progress=False
        )
    finally:
        ray.shutdown()
    assert remote["parts"] == {"total": 3, "finished": 3, "failed": []}
    assert remote["counts"] == local["counts"]
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
