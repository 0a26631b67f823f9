"""Fixtures for the bootstrap tests (helpers live in data_fixtures.py: conftest modules of other
test folders share the name "conftest", so nothing is imported from here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import synth_image, tiny_depth_folder, tiny_gdino_folder


@pytest.fixture(scope="session")
def tiny_gdino(tmp_path_factory) -> Path:
    return tiny_gdino_folder(tmp_path_factory.mktemp("gdino"))


@pytest.fixture(scope="session")
def tiny_depth(tmp_path_factory) -> Path:
    return tiny_depth_folder(tmp_path_factory.mktemp("depth"))


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """Four captioned images, one corrupt JPEG and one image without a caption."""
    root = tmp_path / "imgs"
    root.mkdir()
    caps = ["a man and his dog", "a red car on the bench", "a woman with a cat", "the big tree"]
    for i, c in enumerate(caps):
        synth_image(200 + 20 * i, 160, seed=i).save(root / f"img{i}.jpg", quality=90)
        (root / f"img{i}.txt").write_text(c)
    (root / "img4.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (root / "img4.txt").write_text("a broken dog")
    synth_image(100, 100, seed=9).save(root / "img5.png")  # no caption file
    return root


@pytest.fixture(scope="session")
def tiny_curate(tmp_path_factory) -> dict[str, Path]:
    """The curate models (sfw, watermark, people, llava folders) of mumu_core.data.curate_tiny."""
    from mumu_core.data.curate_tiny import build_tiny_curate_models

    return build_tiny_curate_models(tmp_path_factory.mktemp("curate_models"))
