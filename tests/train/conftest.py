"""Fixtures of the trainer tests: small shards written per the shard record (tiny_models: tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from train_shards import write_shards  # noqa: E402


@pytest.fixture(scope="session")
def fixed_shards(tmp_path_factory) -> list[str]:
    """One shard of two records: with two ranks, each rank sees the same sample every step."""
    return write_shards(tmp_path_factory.mktemp("shards1"), n_shards=1, per_shard=2, controls=())


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> list[str]:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=4)
