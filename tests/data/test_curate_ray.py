"""curate through Ray Data with 2 model actors gives the local run's bytes (one small run: Ray start is slow)."""

from __future__ import annotations

import json

import pytest
from curate_fixtures import SMALL_RULES, photos, write_folder

from mumu_core.data import FolderSource
from mumu_core.data.curate import CurateConfig, curate

ray = pytest.importorskip("ray")


def test_ray_two_workers_matches_local(tiny_curate, tmp_path):
    folder = write_folder(tmp_path / "in", photos(6))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    src = FolderSource(folder, images_per_part=3, captions_required=False)
    cfg = CurateConfig(
        sfw_model=str(tiny_curate["sfw"]),
        watermark_model=str(tiny_curate["watermark"]),
        people_model=str(tiny_curate["people"]),
        caption_model=str(tiny_curate["llava"]),
        caption_max_tokens=4,
        batch_size=2,
        device="cpu",
        **SMALL_RULES,
    )
    local = curate(src, tmp_path / "local", cfg, progress=False, sheet=False)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        remote = curate(
            src, tmp_path / "ray", cfg, executor="ray", num_workers=2, progress=False, sheet=False
        )
    finally:
        ray.shutdown()
    assert remote["workers"] == 2 and remote["executor"] == "ray"
    assert remote["parts"] == {"total": 3, "finished": 3, "skipped_as_finished": 0, "unfinished": []}
    assert remote["counts"] == local["counts"] and remote["reasons"] == local["reasons"]
    assert local["reasons"]["not_an_image"] == 1 and local["counts"]["images_in"] == 7
    for i in range(3):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
        a = json.loads((tmp_path / "ray" / f"shard-{i:06d}.json").read_text())
        b = json.loads((tmp_path / "local" / f"shard-{i:06d}.json").read_text())
        assert a["dropped"] == b["dropped"] and a["kept"] == b["kept"]
