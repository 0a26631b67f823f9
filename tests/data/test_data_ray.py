"""The known-boxes source end to end through Ray Data in local mode (one small run: Ray start is slow)."""

from __future__ import annotations

import json

import pytest
from data_fixtures import synth_image

from mumu_core.data import BootstrapConfig, KnownBoxesSource, bootstrap

ray = pytest.importorskip("ray")


def test_known_boxes_through_ray_matches_local(tmp_path):
    records = [
        {
            "image": synth_image(160, 120, i),
            "caption": "a girl with a red ball",
            "objects": [
                {"phrase": "girl", "span": [2, 6], "box": [5, 5, 70, 115], "head_box": [20, 8, 50, 38]},
                {"phrase": "red ball", "span": [14, 22], "box": [90, 60, 140, 110]},
            ],
        }
        for i in range(3)
    ]
    src = KnownBoxesSource(records, images_per_part=2)
    cfg = BootstrapConfig(min_crop_side=60, controls=("canny",))
    local = bootstrap(src, tmp_path / "local", cfg, progress=False)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = bootstrap(src, tmp_path / "ray", cfg, executor="ray", num_workers=1, progress=False)
    finally:
        ray.shutdown()
    assert remote["parts"] == {"total": 2, "finished": 2, "skipped_as_finished": 0, "failed": []}
    assert remote["counts"] == local["counts"] and remote["filter"] == local["filter"]
    assert local["filter"]["kept"] == 3 and local["filter"]["too_small"] == 3  # the 50 px ball is below 60 px
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    stats = json.loads((tmp_path / "ray" / "shard-000001.json").read_text())
    assert stats["images_out"] == 1 and stats["head_crops"] == 1
