"""Shared pytest fixtures. Keep each fixture small; heavy builders live in pytest-free modules."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked slow first, the order otherwise kept. scripts/test.sh runs two xdist workers with
    --dist loadfile --no-loadscope-reorder, which hands out files in this order: a long file handed out
    last would leave the other core idle at the end (measured: the 5-minute mini training test alone for
    its last 4 minutes; without --no-loadscope-reorder xdist sorts files by test count instead)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model set of mumu_core.testing (VLM folder, SDXL folder + single file, bundle, images),
    built once per test session."""
    from mumu_core.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models", "tiny")
