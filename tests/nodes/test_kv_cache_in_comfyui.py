"""The cross-attention K/V cache in a real ComfyUI's sampler: exact against uncached sampling in every case
the cache must handle, and off (with a log line) where it must not run. See comfy_kv_cache_check.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from check_runner import run_check_script

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.comfyui, pytest.mark.slow]

# fp32 on the CPU; rows projected on their own round differently from a batched matmul in the last bits.
ATOL = 1e-3


@pytest.fixture(scope="module")
def report(comfy_env, comfy_models, sdxl_checkpoint, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("comfy_kv_cache_check")
    return run_check_script(
        "comfy_kv_cache_check.py", comfy_env, comfy_models, sdxl_checkpoint, work, timeout=1200
    )


def _exact_and_used(case: dict, layers: int, rows: int = 1, zero_rows: int = 1) -> None:
    assert case["finite"] and case["scale"] > 0.1, case  # the random UNet's output is not trivially 0
    assert case["max_abs_diff"] <= ATOL * max(1.0, case["scale"]), case
    run = case["run"]
    assert run["active"] and run["reused"] > 0, run
    # Once per layer for the whole run: K and V of each distinct row, V (one token) of the zero negative
    # (timestep_range: 2 steps, the first samples with pos_a only, the second with pos_b only).
    assert run["computed"] == layers * (2 * rows + zero_rows), run


def test_no_errors(report):
    assert not report["errors"], "\n\n".join(f"{e['check']}: {e['tb']}" for e in report["errors"])
    assert report["layers"] > 0


@pytest.mark.parametrize(
    ("case", "rows"),
    [
        ("cfg_batch", 1),  # the positive + the zero negative, one batch
        ("cfg_batch_of_2_latents", 1),  # repeated rows are projected once
        ("combine", 2),
        ("timestep_range", 2),
        ("area", 2),
        ("other_length_negative", 1),  # lengths 120 and 77 do not batch: the negative runs alone
    ],
)
def test_exact_with_comfyui_batching(report, case, rows):
    _exact_and_used(report["checks"][case], report["layers"], rows)


def test_lora_patched_models(report):
    lora = report["checks"]["lora"]
    assert lora["lora_keys"] == 2 * report["layers"]
    assert lora["lora_changes_output"] > 1e-3  # the LoRA matters, so a stale K/V would show
    for name in ("after_1.0", "after_0.5", "base_again", "before_1.0"):
        _exact_and_used(lora[name], report["layers"])


def test_model_shared_by_samplers(report):
    for case in report["checks"]["shared_model"].values():
        _exact_and_used(case, report["layers"])


def test_lora_merge_node_installs_the_cache(report):
    m = report["checks"]["lora_merge_node"]
    assert m["installed"] and m["run"]["active"] and m["run"]["reused"] > 0
    assert m["max_abs_diff"] <= ATOL
    assert m["run"]["peak_mb"] > 0 and m["released_after_run"]  # memory held during the run, freed after it
    # The MUMU Cross-Attention Cache node, for a MODEL that does not come through LoRA Merge.
    assert m["node_installed"] and m["node_run"]["active"] and m["node_run"]["reused"] > 0
    assert m["node_max_abs_diff"] <= ATOL


def test_turns_itself_off_with_a_log_line(report):
    off = report["checks"]["off"]
    assert not off["unmarked"]["active"] and "no MUMU conditioning" in off["unmarked"]["reason"]
    assert not off["switched_off"]["active"] and "kv_cache setting is off" in off["switched_off"]["reason"]
    r = off["attn2_replace"]
    assert not r["run"]["active"] and "attn2 replace" in r["run"]["reason"] and r["replace_calls"] > 0
    assert r["max_abs_diff"] <= ATOL * max(1.0, r["scale"])
    logs = "\n".join(report["log_lines"])
    assert "K/V cache off for this sampling run: no MUMU conditioning" in logs
    assert "projections computed" in logs
