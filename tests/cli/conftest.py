"""What the CLI tests share: an output folder that must stay empty on a refusal, and a spy that fails a
test when a model loads before the arguments were checked."""

from pathlib import Path

import pytest


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def no_models(monkeypatch) -> list:
    """Loading any model fails the test (these mistakes must be found before); returns the calls made."""
    import mipadapter.cli.options as options

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(options, "load_pipeline", refuse)
    monkeypatch.setattr(options, "load_tiny", refuse)
    return calls
