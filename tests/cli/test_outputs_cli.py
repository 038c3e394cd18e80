"""Issue 18 item 7 through the CLI: nothing left behind after faults. A full disk at the second of two
images leaves neither (exit 2, one line naming the file); the temporary a killed run left is removed by
the next run in that folder."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

from PIL import Image

from mipadapter.cli.main import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = ASSETS / "cat.jpg", ASSETS / "backpack.jpg"


def argv(output: Path, *args: str) -> list[str]:
    return ["generate", "--tiny", "--prompt", "a cat wearing a backpack", "--subject", f"cat={CAT}",
            "--subject", f"backpack={BACKPACK}", "--steps", "1", "-o", str(output), *args]  # fmt: skip


def test_a_full_disk_at_the_second_image_leaves_no_image_and_names_the_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    sheet = out / "sheet.png"
    real_save, saved = Image.Image.save, []

    def save(image, target, *args, **kwargs):
        saved.append(target)
        if len(saved) == 2:
            Path(target).write_bytes(b"the first blocks")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(image, target, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code = main(argv(out / "x.png", "--num-images", "2", "--contact-sheet", str(sheet)))
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bar of the denoising steps
    assert (code, err) == (2, f"mipadapter generate: error: [Errno 28] No space left on device: '{out / 'x_2.png'}'")
    assert list(out.iterdir()) == []  # neither x_1.png nor the sheet, nor any temporary


def test_the_temporary_of_a_killed_run_is_removed_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import os, signal, sys\n"
        "from mipadapter.fileio import atomic_write\n"
        "atomic_write(sys.argv[1], lambda tmp: (tmp.write_bytes(b'half'), os.kill(os.getpid(), signal.SIGKILL)))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run([sys.executable, "-c", script, str(out / "x.png")], env=env, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert len([p for p in out.iterdir() if p.name.startswith(".x.")]) == 1
    assert main(argv(out / "y.png")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["y.png"]
