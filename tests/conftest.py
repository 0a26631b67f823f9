"""Shared pytest fixtures. Keep each fixture small; heavy builders live in pytest-free modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny model set of mumu_core.testing (VLM folder, SDXL folder + single file, bundle, images),
    built once per test session."""
    from mumu_core.testing import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "tiny_models", "tiny")
