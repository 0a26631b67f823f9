"""bench/gpu_check.py at tiny size on the CPU: the one-command GPU check runs end to end, so it cannot rot.

No timing is asserted (benchmarks are not timed tests); the structure, exactness of the cached UNet step and
the training step's finiteness are.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_every_section(tmp_path):
    gpu_check = _load()
    out = tmp_path / "gpu.json"
    torch.set_num_threads(1)
    assert gpu_check.main(["--tiny", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["sizes"] == "tiny" and r["device"].startswith("cpu")
    enc = r["encoder"]["per_tokens_per_image"]
    assert set(enc) == {"4", "16"} and enc["16"]["sequence_tokens"] > enc["4"]["sequence_tokens"]
    unet = r["unet_step"]["per_context_tokens"]
    assert set(unet) == {"8", "32", "96"}
    for row in unet.values():
        assert row["uncached_seconds"] > 0 and row["cached_seconds"] > 0
        assert row["max_abs_diff_vs_uncached"] < 1e-4 and row["cache_gib"] > 0
    ers = r["encode_release_sample"]
    assert ers["sample"]["steps"] >= 1 and ers["sample"]["kv_cache_gib"] > 0
    tr = r["train_step"]
    assert tr["losses_finite"] and tr["trainable_params"] > 0 and tr["step_seconds"] > 0
    assert tr["mfu"] is None  # no GPU, no peak: never a made-up MFU


def test_without_a_gpu_the_real_run_refuses(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    gpu_check = _load()
    assert gpu_check.main(["--out", str(tmp_path / "x.json")]) == 2
    assert "error: no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
