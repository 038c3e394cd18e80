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
