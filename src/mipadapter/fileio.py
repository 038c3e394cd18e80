"""Files written whole or not at all, with the permissions the user's umask asks for.

Every output of the project (images, checkpoints, manifests, reports) goes through ``atomic_write``:
the data lands in a temporary file beside the target (same filesystem, so the final rename is atomic)
and is renamed over it only once complete, so a reader or a killed run never sees half a file.
``tempfile.mkstemp`` creates files with mode 0600; the rename would keep that, so the temporary file
is given the mode a plain ``open(path, "w")`` would have given (0666 minus the umask).

``check_output_file`` and ``check_output_dir`` are the checks a command runs on its output paths
before it does anything slow.

Nothing is left behind: a temporary file's name carries the writing process (``.out.1234@1a2b3c4d.
x8k2p0qz.tmp.png``: process id @ host), so the first write into a folder by a later process removes the
temporaries of processes that died mid-write on this machine, and never those of a writer still
running (nor, unless a day old, one on another machine sharing the folder). ``atomic_write_all`` writes
several files all or none; a failed write (a full disk) names the file it was writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

_UMASK_LOCK = threading.Lock()
_SWEPT: set[Path] = set()  # folders this process has already swept of stale temporaries
_SWEPT_LOCK = threading.Lock()
FOREIGN_STALE_SECONDS = 24 * 3600  # another machine's temporary counts as stale after this
_TEMP_NAME = re.compile(r"^\..*\.(?P<pid>\d+)@(?P<host>[0-9a-f]{8})\.[a-z0-9_]{8}\.tmp(?:\.[A-Za-z0-9]+)?$")


def current_umask() -> int:
    """The process's umask (read by setting and restoring it: there is no pure read in ``os``)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 minus the umask."""
    return 0o666 & ~current_umask()


def _host_tag() -> str:
    """8 hex digits for this machine (a hash of its host name): which temporaries' process ids mean
    anything here."""
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (signal 0 tests without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a number we cannot test: keep its file
    return True


def stale_temporaries(folder: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """The temporaries ``atomic_write`` left in ``folder`` that no running writer owns: those of a process
    of this machine that is gone, and another machine's older than ``FOREIGN_STALE_SECONDS``. Only names
    of our own pattern (``.STEM.PID@HOST.XXXXXXXX.tmp.SUFFIX``) are considered: a user's files never are."""
    folder = Path(folder)
    now = time.time() if now is None else now
    here = _host_tag()
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False):
            continue
        if match["host"] == here:
            if not _alive(int(match["pid"])):
                found.append(Path(entry.path))
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if age > FOREIGN_STALE_SECONDS:
            found.append(Path(entry.path))
    return sorted(found)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``stale_temporaries(folder)``; returns what was removed (a file already gone is skipped)."""
    removed = []
    for path in stale_temporaries(folder):
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to fight over: a read-only folder keeps it
        removed.append(path)
    return removed


def _sweep_once(folder: Path) -> None:
    """Remove the folder's stale temporaries on this process's first write into it."""
    key = folder.resolve()
    with _SWEPT_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    remove_stale_temporaries(folder)


def _temporary(path: Path) -> Path:
    """A new empty temporary file beside ``path`` (same suffix, so writers that read it see the real one),
    named after this process (see the module's docstring)."""
    prefix = f".{path.stem}.{os.getpid()}@{_host_tag()}."
    handle, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    return Path(tmp_name)


def _named(error: OSError, path: Path) -> OSError:
    """``error`` again, naming ``path`` (the target, not the temporary): "[Errno 28] No space left on
    device: 'out_2.png'"."""
    if error.errno is None:
        return OSError(f"{path}: {error}")
    return OSError(error.errno, error.strerror or str(error), str(path))


def _write_temporary(path: Path, write: Callable[[Path], None], fsync: bool) -> Path:
    """``write`` into a new temporary beside ``path``, synced and given the umask's mode; on failure the
    temporary is removed and an ``OSError`` names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    tmp = _temporary(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
        os.chmod(tmp, default_file_mode())
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise _named(error, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Produce ``path`` by calling ``write(tmp)`` on a temporary path beside it, then renaming.

    Missing parent folders are made (commands check their outputs up front with ``check_output_file``,
    which refuses a missing folder a user named). The temporary file keeps the target's suffix, so writers
    that pick a format from the name (PIL, safetensors) see the real one. On any failure the temporary
    file is removed and the target is left as it was; an ``OSError`` (a full disk) names ``path``. The
    first write into a folder removes the temporaries that killed writers left there. Returns ``path``.
    """
    return atomic_write_all([(path, write)], fsync=fsync)[0]


def atomic_write_all(
    items: Sequence[tuple[str | os.PathLike, Callable[[Path], None]]], *, fsync: bool = False
) -> list[Path]:
    """Write several files all or none: every ``write(tmp)`` into its own temporary first, and only when
    all have succeeded are they renamed into place (renames within a folder do not fail for want of
    space). On any failure every temporary is removed and no target changes. Returns the paths."""
    paths = [Path(path) for path, _ in items]
    done: list[Path] = []
    try:
        for path, (_, write) in zip(paths, items, strict=True):
            done.append(_write_temporary(path, write, fsync))
        for tmp, path in zip(done, paths, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        raise
    return paths


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
    try:  # os.access reads permission bits only: /proc or a read-only mount refuse just the real file
        _temporary(path).unlink()
    except OSError as error:
        raise ValueError(
            f"{what} {str(path)!r}: the folder {str(parent)!r} is not writable "
            f"(creating a file there fails: {error.strerror or error})"
        ) from None
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
