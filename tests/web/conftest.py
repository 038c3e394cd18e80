"""Shared set-up of the web tests: the ``browser`` marker and what a browser test needs to run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("MIPADAPTER_CHROMIUM", "/usr/bin/chromium"))
"""Debian's Chromium (``apt-get install chromium``); never a browser that a client downloads."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "browser: drives Debian's headless Chromium against `mipadapter web --tiny` (CI runs them)"
    )


def require(*needs: str) -> None:
    """Skip, naming what is missing, where a need is absent; under CI (``CI=true``, where .ci/extra
    installs everything) fail instead, so that a browser test never passes by not running."""
    missing = []
    if "gradio" in needs and importlib.util.find_spec("gradio") is None:
        missing.append("gradio (pip install 'mipadapter[web]')")
    if "playwright" in needs and importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python client (pip install playwright)")
    if "chromium" in needs and not CHROMIUM.is_file():
        missing.append(f"Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    if not missing:
        return
    reason = "needs " + "; ".join(missing)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}: .ci/extra should have installed it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def need():
    """``need("gradio", "playwright", "chromium")``: skip (or under CI fail) unless all are here."""
    return require


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Where Debian's Chromium is (``MIPADAPTER_CHROMIUM`` overrides ``/usr/bin/chromium``)."""
    return CHROMIUM
