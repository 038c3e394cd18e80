"""Fixtures of the evaluation tests (helpers live in ``eval_fakes``)."""

from __future__ import annotations

import pytest
from eval_fakes import build_tiny_encoders


@pytest.fixture(scope="session")
def tiny_encoders():
    """Tiny random CLIP and DINO encoders (read-only: shared by the session)."""
    return build_tiny_encoders()
