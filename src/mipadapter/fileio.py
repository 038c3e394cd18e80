"""Files written whole or not at all, with the permissions the user's umask asks for.

Every output of the project (images, checkpoints, manifests, reports) goes through ``atomic_write``:
the data lands in a temporary file beside the target (same filesystem, so the final rename is atomic)
and is renamed over it only once complete, so a reader or a killed run never sees half a file.
``tempfile.mkstemp`` creates files with mode 0600; the rename would keep that, so the temporary file
is given the mode a plain ``open(path, "w")`` would have given (0666 minus the umask).

``check_output_file`` and ``check_output_dir`` are the checks a command runs on its output paths
before it does anything slow.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no pure read in ``os``)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


# the names `atomic_write` gives its temporary files: "." + target stem + "." + mkstemp's 8 random
# characters + ".tmp" + target suffix
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]+)?$")


def is_stale_temp(path: Path) -> bool:
    """Whether ``path`` is a regular file named like a temporary file of ``atomic_write``."""
    return bool(_TEMP_NAME.match(path.name)) and path.is_file() and not path.is_symlink()


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted ``atomic_write`` left in ``folder`` (not below it): files named like
    its temporary files. Only for a folder no other process is writing into (a run's own folders, at
    its start). Returns the removed paths; a missing folder removes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        if is_stale_temp(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Produce ``path`` by calling ``write(tmp)`` on a temporary path beside it, then renaming.

    Missing parent folders are made (commands check their outputs up front with ``check_output_file``,
    which refuses a missing folder a user named). The temporary file keeps the target's suffix, so writers that pick a format from the name (PIL,
    safetensors) see the real one. On any failure the temporary file is removed and the target is left
    as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def check_output_file(
    path: str | os.PathLike, what: str, suffixes: Iterable[str] | None = None, *, create_parent: bool = False
) -> Path:
    """Refuse an output file path that cannot be written, before any slow work.

    what: how errors name it (a CLI flag such as ``-o``, or a Python argument name). suffixes: the
    accepted extensions, lower case with the dot (``(".png", ".jpg")``); None accepts any.
    create_parent: make a missing parent folder instead of refusing it.
    Raises ``FileNotFoundError`` (missing parent) or ``ValueError`` (a folder, a read-only place, an
    unknown extension); returns the path.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give a file name")
    if suffixes is not None:
        accepted = tuple(suffixes)
        if path.suffix.lower() not in accepted:
            raise ValueError(f"{what} {str(path)!r}: the extension must be one of {', '.join(accepted)}")
    parent = path.parent
    if not parent.exists() and create_parent:
        parent.mkdir(parents=True, exist_ok=True)
    if not parent.exists():
        raise FileNotFoundError(f"{what} {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r}: the folder {str(parent)!r} is not writable")
    if path.exists() and not os.access(path, os.W_OK) and not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} exists and cannot be replaced")
    return path


def check_output_dir(path: str | os.PathLike, what: str, *, create: bool = True) -> Path:
    """Refuse an output folder that cannot be written (``create``: make it when missing). Returns it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; give a folder")
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"{what} {str(path)!r} cannot be created: {error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} is not writable")
    return path


def check_creatable_dir(path: str | os.PathLike, what: str) -> Path:
    """Refuse an output folder that could not be written, without creating it (a run that fails its
    later checks leaves no empty folder behind): the folder, or its nearest existing parent, must be a
    writable folder. Returns the path."""
    path = Path(path).expanduser()
    if path.exists():
        return check_output_dir(path, what, create=False)
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(path)!r} cannot be created: {str(parent)!r} is not writable")
    return path
