"""Fixtures: synthetic data sets in the authors' layout and as a manifest."""

from __future__ import annotations

from pathlib import Path

import pytest
from synthetic_data import write_authors_layout, write_manifest_layout


@pytest.fixture
def authors_data(tmp_path) -> Path:
    root = tmp_path / "authors"
    write_authors_layout(root, 6)
    return root


@pytest.fixture
def manifest_data(tmp_path) -> Path:
    return write_manifest_layout(tmp_path / "manifest", 6)
