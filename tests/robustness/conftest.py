"""Fixtures of the bad-input matrix (tiny_models: tests/conftest.py). Helpers: robust_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from robust_helpers import write_bad_shards  # noqa: E402


@pytest.fixture(scope="session")
def bad_shards(tmp_path_factory) -> dict[str, list[str] | str]:
    """Good shards plus a truncated tar, a garbage tar and a shard of broken records."""
    return write_bad_shards(tmp_path_factory.mktemp("bad_shards"))
