"""Helpers of the bad-input matrix: commands run as subprocesses, as a user would run them, and
shards with the real-world damage a long job meets (docs/ERRORS.md)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
CONFIGS = ROOT / "train" / "configs"
sys.path.insert(0, str(ROOT / "tests" / "train"))

from train_shards import make_record, write_shards  # noqa: E402


def run_cmd(args: list[str], timeout: int = 600, umask: int | None = None, **env: str):
    """``python ARGS`` in the repository root; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    if "MUMU_DEBUG" not in env:
        full_env.pop("MUMU_DEBUG", None)
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error: " in line]


def assert_clean_error(res, *needles: str, code: int = 2) -> str:
    """Exit ``code``, an ``error:`` line holding every needle, and no traceback."""
    text = res.stdout + res.stderr
    assert res.returncode == code, (res.returncode, text[-3000:])
    lines = error_lines(res.stderr)
    assert lines, text[-3000:]
    assert all(n in lines[0] for n in needles), (needles, lines)
    assert "Traceback" not in text, text[-3000:]
    return lines[0]


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to prove nothing written changed)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train_args(tiny_models, shards: list[str], out: Path, *extra: str) -> list[str]:
    return [
        "-m", "train", "--config", str(CONFIGS / "tiny.yaml"), "--set",
        f"model.vlm={tiny_models.vlm}", f"model.sdxl={tiny_models.sdxl}", f"data.shards={','.join(shards)}",
        f"out_dir={out}", "logging.progress=false", *extra,
    ]  # fmt: skip


def write_bad_shards(folder: Path) -> dict[str, list[str] | str]:
    """``good``: two good shards; ``truncated``: a good shard cut in the middle of its second sample;
    ``garbage``: random bytes named .tar; ``broken``: a shard whose samples have a corrupt jpg, a json
    that is not JSON, no json at all, and one good record."""
    import webdataset as wds

    good = write_shards(folder / "good", n_shards=2, per_shard=3, controls=())
    full = Path(write_shards(folder / "full", n_shards=1, per_shard=3, seed=7, controls=())[0]).read_bytes()
    truncated = folder / "truncated.tar"
    truncated.write_bytes(full[: len(full) // 2 + 700])
    garbage = folder / "garbage.tar"
    garbage.write_bytes(random.Random(0).randbytes(20_000))
    broken = folder / "broken.tar"
    rng = random.Random(3)
    with wds.TarWriter(str(broken)) as sink:
        bad_jpg = make_record(100, rng, 2, ())
        bad_jpg["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
        bad_jpg["__key__"] = "s000009-000000"
        bad_json = make_record(101, rng, 2, ())
        bad_json["json"] = b"{not json"
        bad_json["__key__"] = "s000009-000001"
        no_json = make_record(102, rng, 2, ())
        del no_json["json"]
        no_json["__key__"] = "s000009-000002"
        ok = make_record(103, rng, 2, ())
        ok["__key__"] = "s000009-000003"
        for sample in (bad_jpg, bad_json, no_json, ok):
            sink.write(sample)
    return {"good": good, "truncated": str(truncated), "garbage": str(garbage), "broken": str(broken)}


def losses(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


def pickle_payload(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when it is unpickled (what a crafted .metadata would do)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    pickle.dump(Payload(), buf)
    return buf.getvalue()
