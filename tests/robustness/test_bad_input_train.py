"""The trainer against bad input, run as ``python -m train`` (and torchrun) like a user would.

Classes (issue 12): corrupt samples / shards are skipped, counted and resumed past; too much bad data
stops with exit 2; resume applies the configured learning rates or refuses what it cannot honour;
nothing in a run folder is unpickled; every other input error is one ``error:`` line with exit 2,
on every rank, before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from robust_helpers import (
    CONFIGS,
    ROOT,
    assert_clean_error,
    error_lines,
    losses,
    pickle_payload,
    run_cmd,
    train_args,
    tree_digest,
)


def all_shards(bad_shards) -> list[str]:
    return [*bad_shards["good"], bad_shards["truncated"], bad_shards["garbage"], bad_shards["broken"]]


@pytest.mark.slow
def test_corrupt_samples_and_shards_are_skipped_counted_and_resume_gets_past(
    tiny_models, bad_shards, tmp_path
):
    shards = all_shards(bad_shards)
    straight = tmp_path / "straight"
    res = run_cmd(train_args(tiny_models, shards, straight, "optim.max_steps=4", "checkpoint.every=2"))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    # Each skipped item is named with its shard and key (or as a broken shard) ...
    err = res.stderr
    for key in ("s000009-000000", "s000009-000001", "s000009-000002"):
        assert f"skipped sample {key} of {bad_shards['broken']}" in err, err[-3000:]
    assert "not a decodable image" in err and "not valid JSON" in err and "no json record" in err
    assert f"skipped shard {bad_shards['garbage']}: unreadable tar" in err
    assert f"skipped shard {bad_shards['truncated']}: unreadable tar" in err
    # ... counted in losses.jsonl and TensorBoard ...
    ref = losses(straight)
    assert sorted(ref) == [1, 2, 3, 4]
    assert ref[4]["data_bad"] >= 3 and ref[4]["data_read"] > ref[4]["data_bad"]
    events = b"".join(p.read_bytes() for p in (straight / "tb").glob("events.*"))
    assert b"data/bad_items" in events
    # ... and a checkpoint holds only safetensors and JSON (nothing that needs pickle).
    ckpt = straight / "checkpoints" / "step_00000004"
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}

    # A run stopped at step 2 and resumed gets past the same bad items, to the same losses.
    stopped = tmp_path / "stopped"
    res = run_cmd(train_args(tiny_models, shards, stopped, "optim.max_steps=2", "checkpoint.every=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cmd(train_args(tiny_models, shards, stopped, "optim.max_steps=4", "checkpoint.every=2"))
    assert res.returncode == 0, res.stderr[-3000:]
    got = losses(stopped)
    assert sorted(got) == [1, 2, 3, 4]
    for s in (3, 4):
        assert abs(got[s]["loss"] - ref[s]["loss"]) <= 1e-5 * max(1.0, ref[s]["loss"]), (s, got, ref)
        assert (got[s]["data_read"], got[s]["data_bad"]) == (ref[s]["data_read"], ref[s]["data_bad"])


def test_too_much_bad_data_stops_with_one_error_line(tiny_models, bad_shards, tmp_path):
    out = tmp_path / "run"
    res = run_cmd(
        train_args(
            tiny_models, all_shards(bad_shards), out, "data.max_bad_samples=0", "data.max_bad_fraction=0"
        )
    )
    line = assert_clean_error(res, "were bad", "data.max_bad_samples=0")
    assert "Fix or remove those shards" in line
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_resume_applies_the_configured_learning_rates_and_refuses_other_changes(
    tiny_models, bad_shards, tmp_path, monkeypatch
):
    import torch

    from train.config import load_config
    from train.loop import run

    out = tmp_path / "run"

    def cfg(*extra: str):
        return load_config(
            CONFIGS / "tiny.yaml",
            [
                f"model.vlm={tiny_models.vlm}",
                f"model.sdxl={tiny_models.sdxl}",
                f"data.shards={','.join(bad_shards['good'])}",
                f"out_dir={out}",
                "logging.tensorboard=false",
                "checkpoint.every=2",
                *extra,
            ],
        )

    run(cfg("optim.max_steps=2"))
    seen: list[dict[str, float]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(cfg("optim.max_steps=3", "parts.connector.lr=2.5e-4", "parts.unet.lr=1.0e-4"))
    assert seen == [{"vlm": 1e-3, "connector": 2.5e-4, "unet": 1e-4}], seen
    assert losses(out)[3]["lr"] == {"vlm": 1e-3, "connector": 2.5e-4, "unet": 1e-4}
    monkeypatch.undo()

    # A change the checkpoint cannot honour is refused with what changed and what to do; nothing in
    # the run folder changes.
    before = tree_digest(out)
    res = run_cmd(train_args(tiny_models, bad_shards["good"], out, "optim.max_steps=4", "parts.unet.rank=8"))
    assert_clean_error(res, "cannot resume", "parts.unet.rank was 4 and is now 8", "new run")
    assert tree_digest(out) == before


def test_a_crafted_pickle_in_a_run_folder_is_never_executed(tiny_models, bad_shards, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "PAYLOAD_RAN"
    (ckpt / ".metadata").write_bytes(pickle_payload(marker))
    (ckpt / "__0_0.distcp").write_bytes(pickle_payload(marker))
    # What the earlier trainer wrote beside the DCP files; its config is this run's.
    from train.config import load_config

    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [f"model.vlm={tiny_models.vlm}", f"model.sdxl={tiny_models.sdxl}",
         f"data.shards={','.join(bad_shards['good'])}", f"out_dir={out}"],
    )  # fmt: skip
    (ckpt / "trainer.json").write_text(
        json.dumps({"step": 1, "world_size": 1, "prediction_type": "epsilon", "config": cfg.to_dict()})
    )
    (ckpt / "rank0.json").write_text(json.dumps({"data_position": [0, 2], "rng": {}}))
    before = tree_digest(out)

    res = run_cmd(train_args(tiny_models, bad_shards["good"], out, "optim.max_steps=2"))
    assert_clean_error(res, "torch.distributed.checkpoint format", "pickle", "never loaded")
    res = run_cmd(["-m", "train", "export", str(out), "--dest", str(tmp_path / "exported")])
    assert_clean_error(res, "pickle", "never loaded")
    assert not marker.exists(), "the pickle payload ran"
    assert tree_digest(out) == before
    assert not (tmp_path / "exported").exists()


def test_input_errors_are_one_line_exit_2_before_any_model_loads(tiny_models, bad_shards, tmp_path):
    good = bad_shards["good"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  preset: tiny\n  vlm: [unclosed\n")
    garbage_bundle = tmp_path / "bundle.safetensors"
    garbage_bundle.write_bytes(b"\x00" * 64)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = {
        "missing data folder": (
            train_args(tiny_models, [str(tmp_path / "no_such_dir" / "*.tar")], tmp_path / "o1"),
            ["matches no file", "data.shards"],
        ),
        "data folder instead of tars": (
            train_args(tiny_models, [str(Path(good[0]).parent)], tmp_path / "o2"),
            ["is a folder", "*.tar"],
        ),
        "missing model folder": (
            train_args(tiny_models, good, tmp_path / "o3", f"model.vlm={tmp_path / 'no_vlm'}"),
            ["no_vlm does not exist", "Idefics2"],
        ),
        "missing sdxl": (
            train_args(tiny_models, good, tmp_path / "o4", f"model.sdxl={tmp_path / 'no.safetensors'}"),
            ["no.safetensors does not exist"],
        ),
        "bad bundle": (
            train_args(tiny_models, good, tmp_path / "o5", f"model.init_bundle={garbage_bundle}"),
            ["bundle.safetensors"],
        ),
        "yaml syntax error": (["-m", "train", "--config", str(bad_yaml)], ["is not valid YAML", "bad.yaml"]),
        "unwritable out_dir": (
            train_args(tiny_models, good, a_file / "run"),
            ["out_dir", "not a writable folder"],
        ),
    }
    for name, (args, needles) in cases.items():
        res = run_cmd(args, timeout=300)
        assert_clean_error(res, *needles), name
        assert "trainable parameters" not in res.stdout + res.stderr, f"{name}: models loaded first"
    assert a_file.read_text() == "not a folder"


@pytest.mark.slow
def test_torchrun_input_error_is_one_line_on_every_rank(tiny_models, tmp_path):
    args = train_args(tiny_models, [str(tmp_path / "nowhere" / "*.tar")], tmp_path / "o")
    res = run_cmd(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args], timeout=300
    )
    assert res.returncode != 0
    lines = error_lines(res.stderr)
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"[rank {rank}] error: ")]
        assert len(mine) == 1 and "matches no file" in mine[0], lines
    # torchrun's own summary follows, but no rank printed a traceback of the trainer.
    assert f'File "{ROOT / "train"}' not in res.stderr, res.stderr[-3000:]
