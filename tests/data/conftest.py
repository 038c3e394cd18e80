"""Fixtures of the data pipeline tests (helpers live in `data_fakes`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fakes import make_sa1b_shards


@pytest.fixture
def sa1b(tmp_path: Path) -> Path:
    """Four synthetic SA-1B tar shards (see `data_fakes.make_sa1b_shards`)."""
    return make_sa1b_shards(tmp_path / "sa1b")
