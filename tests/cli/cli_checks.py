"""Checks the CLI tests share (imported by name: pytest puts this folder on the path)."""

from pathlib import Path

import numpy as np
from PIL import Image


def refusal(capsys, code: int, out: Path) -> str:
    """The one line of a refusal, after ``mipadapter COMMAND: error: ``: exit status 2, one line on
    stderr, nothing left in ``out``."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("mipadapter ") and ": error: " in err, err
    assert list(out.iterdir()) == [], "a file was left behind"
    return err.split(": error: ", 1)[1].rstrip("\n")


def pixels(path: Path) -> np.ndarray:
    """An image file's RGB pixels."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
