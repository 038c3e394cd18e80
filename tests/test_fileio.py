import os
import stat

import pytest

from mipadapter.fileio import (
    atomic_write,
    atomic_write_text,
    check_output_dir,
    check_output_file,
    default_file_mode,
)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "out.json", "{}")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
        assert _mode(path) == _mode(plain) == 0o666 & ~umask == default_file_mode()
    finally:
        os.umask(previous)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def broken(tmp):
        assert tmp.parent == tmp_path and tmp.suffix == ".safetensors"  # writers that read the suffix see it
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_atomic_write_replaces_whole(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]


def test_check_output_file_names_the_flag(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match=r"^-o '.*adir' is a folder"):
        check_output_file(tmp_path / "adir", "-o", (".png",))  # the folder, not its missing extension
    with pytest.raises(FileNotFoundError, match=r"^--contact-sheet '.*missing/s.png': the folder"):
        check_output_file(tmp_path / "missing" / "s.png", "--contact-sheet")
    with pytest.raises(ValueError, match=r"^-o .*extension must be one of .png, .jpg"):
        check_output_file(tmp_path / "x.gif", "-o", (".png", ".jpg"))
    assert check_output_file(tmp_path / "x.JPG", "-o", (".png", ".jpg")) == tmp_path / "x.JPG"
    assert check_output_file(tmp_path / "new" / "x.png", "out", create_parent=True).parent.is_dir()
    assert list(tmp_path.glob("*.png")) == []  # checking writes nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_file_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match="not writable"):
            check_output_file(folder / "x.png", "-o")
    finally:
        folder.chmod(0o755)


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"^--out '.*file' is a file"):
        check_output_dir(tmp_path / "file", "--out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_output_dir(tmp_path / "nope", "--out", create=False)
    assert check_output_dir(tmp_path / "a" / "b", "--out").is_dir()


# ----------------------------------------------------------------------------------------------- issue 18
KILLED_WRITER = """
import os, signal, sys
from mipadapter.fileio import atomic_write

def write(tmp):
    tmp.write_bytes(b"half an image")
    os.kill(os.getpid(), signal.SIGKILL)  # killed inside the atomic-write window

atomic_write(sys.argv[1], write)
"""

BLOCKED_WRITER = """
import sys
from mipadapter.fileio import atomic_write

def write(tmp):
    tmp.write_bytes(b"partial")
    print("writing", flush=True)
    sys.stdin.read()  # still writing until the test lets go
    tmp.write_bytes(b"whole")

atomic_write(sys.argv[1], write)
"""


def _python(script: str, *args: str, **kwargs):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, text=True, **kwargs)


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def killed_temporary(folder) -> str:
    """Run a writer that is killed mid-write into ``folder``; returns the temporary it left."""
    process = _python(KILLED_WRITER, str(folder / "out.png"))
    assert process.wait(timeout=60) == -9
    left = _temporaries(folder)
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".tmp.png"), left
    assert not (folder / "out.png").exists()
    return left[0]


def test_a_killed_writers_temporary_is_removed_by_the_next_write_in_that_folder(tmp_path):
    from mipadapter.fileio import remove_stale_temporaries

    killed_temporary(tmp_path)
    (tmp_path / ".notes.abcdefgh.tmp.png").write_text("a user's file of a similar name")
    atomic_write_text(tmp_path / "other.json", "{}")  # this process's first write here sweeps it
    assert _temporaries(tmp_path) == [".notes.abcdefgh.tmp.png"]
    assert remove_stale_temporaries(tmp_path) == []


def test_a_running_writers_temporary_is_never_removed(tmp_path):
    import subprocess

    from mipadapter.fileio import remove_stale_temporaries, stale_temporaries

    writer = _python(BLOCKED_WRITER, str(tmp_path / "slow.png"), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert writer.stdout.readline() == "writing\n"
    temporary = _temporaries(tmp_path)
    assert len(temporary) == 1
    assert stale_temporaries(tmp_path) == [] and remove_stale_temporaries(tmp_path) == []
    atomic_write_text(tmp_path / "other.json", "{}")
    assert _temporaries(tmp_path) == temporary  # a concurrent write in the same folder left it alone
    writer.communicate("", timeout=60)
    assert writer.returncode == 0 and (tmp_path / "slow.png").read_bytes() == b"whole"
    assert _temporaries(tmp_path) == []


def test_another_machines_temporary_is_removed_only_when_a_day_old(tmp_path):
    import time

    from mipadapter.fileio import FOREIGN_STALE_SECONDS, _host_tag, stale_temporaries

    other = "00000000" if _host_tag() != "00000000" else "11111111"
    fresh = tmp_path / f".out.{os.getpid()}@{other}.abcd1234.tmp.png"
    old = tmp_path / f".out.1@{other}.wxyz5678.tmp.png"
    fresh.write_bytes(b"x")
    old.write_bytes(b"x")
    past = time.time() - FOREIGN_STALE_SECONDS - 60
    os.utime(old, (past, past))
    assert stale_temporaries(tmp_path) == [old]


def test_several_files_are_written_all_or_none_and_a_full_disk_names_the_file(tmp_path):
    import errno

    from mipadapter.fileio import atomic_write_all

    (tmp_path / "b.png").write_bytes(b"old b")

    def full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    items = [(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"a")), (tmp_path / "b.png", full)]
    with pytest.raises(OSError) as raised:
        atomic_write_all(items)
    assert str(raised.value) == f"[Errno 28] No space left on device: '{tmp_path / 'b.png'}'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.png"]  # no a.png, no temporary
    assert (tmp_path / "b.png").read_bytes() == b"old b"
    written = atomic_write_all([(tmp_path / "a.png", lambda tmp: tmp.write_bytes(b"a")),
                                (tmp_path / "b.png", lambda tmp: tmp.write_bytes(b"b"))])  # fmt: skip
    assert [p.read_bytes() for p in written] == [b"a", b"b"]
