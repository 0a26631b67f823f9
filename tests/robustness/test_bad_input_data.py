"""``python -m mumu_core.data bootstrap`` against bad input, run as a user would (docs/ERRORS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from robust_helpers import ROOT, run_cmd

sys.path.insert(0, str(ROOT / "tests" / "data"))

from data_fixtures import synth_image, tiny_gdino_folder  # noqa: E402


@pytest.fixture(scope="module")
def gdino(tmp_path_factory) -> Path:
    return tiny_gdino_folder(tmp_path_factory.mktemp("gdino"))


def bootstrap_args(inp: Path, out: Path, gdino: Path) -> list[str]:
    return [
        "-m", "mumu_core.data", "bootstrap", "--input", str(inp), "--format", "folder", "--out", str(out),
        "--detector", str(gdino), "--controls", "canny", "--no-progress", "--no-head-detection",
    ]  # fmt: skip


def test_an_undecodable_caption_skips_that_image_not_the_part(gdino, tmp_path):
    inp = tmp_path / "imgs"
    inp.mkdir()
    for i, cap in enumerate(["a man and his dog", "a red car", "a woman with a cat"]):
        synth_image(120, 100, seed=i).save(inp / f"img{i}.jpg")
        (inp / f"img{i}.txt").write_text(cap)
    (inp / "img1.txt").write_bytes(b"a caf\xe9 in latin-1")  # not UTF-8
    out = tmp_path / "out"
    res = run_cmd(bootstrap_args(inp, out, gdino))
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((out / "shard-000000.json").read_text())
    assert stats["images_in"] == 3 and stats["images_out"] == 2
    (err,) = stats["errors"]
    assert err["source_key"] == "img1.jpg" and "is not UTF-8 text" in err["error"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"]["failed"] == [] and manifest["counts"]["images_skipped"] == 1


def test_temp_files_of_a_killed_run_are_removed(gdino, tmp_path):
    inp = tmp_path / "imgs"
    inp.mkdir()
    synth_image(120, 100, seed=0).save(inp / "img0.jpg")
    (inp / "img0.txt").write_text("a man and his dog")
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)  # that process has exited: its temp files are garbage
    stale = [
        out / f".shard-000000.tar.tmp-{dead_pid}-0123abcd",
        out / f".manifest.json.tmp-{dead_pid}-deadbeef",
    ]
    for p in stale:
        p.write_bytes(b"half a file")
    live = out / f".shard-000007.tar.tmp-{1}-0badc0de"  # pid 1 runs: another live writer's file
    live.write_bytes(b"being written")
    res = run_cmd(bootstrap_args(inp, out, gdino))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not any(p.exists() for p in stale)
    assert live.exists()
    assert (out / "shard-000000.tar").is_file() and (out / "manifest.json").is_file()
