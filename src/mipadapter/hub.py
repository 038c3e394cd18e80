"""Where a model comes from: a local path, or a Hub id ``owner/repo[/path/inside]`` (layer 0).

Every model loader of the project resolves its model through this module, so that a missing model
fails the same way everywhere: at once, in one line that names the model, what it is for, and the
flag or config key that points at a local copy (``where``)::

    resolve_file(source, what, where) -> Path                  # a checkpoint file (adapter)
    resolve_folder(source, what, where, marker=...) -> (location, subfolder)   # for from_pretrained
    resolve_folder_file(source, inside, what, where) -> Path   # one file of a model folder (a config)
    fetch_failed(source, what, where, error) -> ModelNotFoundError   # wrap a from_pretrained failure

e.g. ``resolve_folder("Salesforce/blip2-opt-2.7b", "captioner", "caption_model in the data config")``.

Order of the search: a local path is used as is; a Hub id is looked up in the local Hugging Face cache
first (no network); when it is not cached and the Hub cannot be reached, ``ModelNotFoundError`` is
raised immediately instead of letting huggingface_hub retry for half a minute. "Cannot be reached"
means ``HF_HUB_OFFLINE`` is set, or a single TCP connection to the Hub endpoint (``HF_ENDPOINT``) fails
within ``PROBE_TIMEOUT_S`` seconds (no retries; the answer is remembered for ``PROBE_MEMORY_S``). On a
machine with no route to huggingface.co the probe answers in a few milliseconds (name resolution fails).
Online, a Hub id is handed to ``hf_hub_download`` / ``from_pretrained``, which download with progress bars.

No project imports here; huggingface_hub is imported inside the functions that need it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
PROBE_MEMORY_S = 60.0
_TRUE = {"1", "on", "yes", "true"}
_probe_cache: dict[str, tuple[float, bool]] = {}


class ModelNotFoundError(FileNotFoundError):
    """A model could be found neither on disk nor on the Hub; the message says how to point at a copy."""


# ----------------------------------------------------------------------------------------------- reachability
def offline_by_setting() -> bool:
    """``HF_HUB_OFFLINE`` (the environment, or huggingface_hub's constant read when it was imported)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        import huggingface_hub.constants as constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    try:
        import huggingface_hub.constants as constants

        return constants.ENDPOINT
    except ImportError:
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(endpoint: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether one TCP connection to the Hub endpoint opens within ``timeout`` s (name lookup included).

    The lookup runs in a daemon thread so that a resolver that hangs cannot hold the caller longer than
    ``timeout``. Answers are remembered for ``PROBE_MEMORY_S`` seconds per endpoint.
    """
    endpoint = endpoint or hub_endpoint()
    now = time.monotonic()
    remembered = _probe_cache.get(endpoint)
    if remembered is not None and now - remembered[0] < PROBE_MEMORY_S:
        return remembered[1]
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = [False]

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    _probe_cache[endpoint] = (time.monotonic(), result[0])
    return result[0]


def hub_offline() -> bool:
    """True when the Hub cannot be used: ``HF_HUB_OFFLINE`` is set, or the endpoint does not answer."""
    return offline_by_setting() or not hub_reachable()


def _offline_reason() -> str:
    if offline_by_setting():
        return "HF_HUB_OFFLINE is set"
    return f"{hub_endpoint()} cannot be reached"


# ----------------------------------------------------------------------------------------------- errors
def _not_found(source: str, what: str, where: str, reason: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not fetch the {what} {source!r} from the Hugging Face Hub ({reason}); download it where "
        f"you have network and point {where} at a local copy"
    )


def fetch_failed(source: str | os.PathLike, what: str, where: str, error: Exception) -> ModelNotFoundError:
    """The one-line error for a failed download or ``from_pretrained`` of a Hub id (or of a local copy,
    which then is not said to come from the Hub)."""
    detail = (str(error).strip().splitlines() or ["no detail"])[0]
    if len(detail) > 160:
        detail = detail[:157] + "…"
    if Path(source).expanduser().exists():  # a local copy that does not load: nothing was fetched
        return ModelNotFoundError(
            f"could not load the {what} {str(source)!r} ({type(error).__name__}: {detail}); point {where} "
            "at a complete copy of the model"
        )
    return _not_found(str(source), what, where, f"{type(error).__name__}: {detail}")


def _not_cached_offline(source: str, what: str, where: str) -> ModelNotFoundError:
    return _not_found(source, what, where, f"not in the local cache and {_offline_reason()}")


# ----------------------------------------------------------------------------------------------- resolving
def looks_local(source: str) -> bool:
    """A path no Hub id can be: absolute, relative to ``.``/``..``/``~``, or with backslashes."""
    return (
        source.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in source or source in (".", "..")
    )


def split_hub_path(source: str, what: str = "model") -> tuple[str, str | None]:
    """``owner/repo/sub/path`` → (``owner/repo``, ``sub/path`` or None); a local-looking path that does not
    exist is reported as such."""
    if looks_local(source):
        raise ModelNotFoundError(f"{what} {source!r} does not exist")
    parts = source.strip("/").split("/")
    if len(parts) < 2 or not all(parts) or any(part in (".", "..") for part in parts):
        raise ModelNotFoundError(
            f"{what} {source!r} is neither an existing local path nor a Hub id like owner/repo[/path]"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _cached(repo_id: str, filename: str, what: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached copy of one Hub file, or None (never touches the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except ValueError:  # huggingface_hub's id validation: not a possible repo id
        raise ModelNotFoundError(
            f"{what} {repo_id + '/' + filename!r} is neither an existing local path nor a valid Hub id"
        ) from None
    return Path(found) if isinstance(found, str) else None


def _download(repo_id: str, filename: str, source: str, what: str, where: str, cache_dir) -> Path:
    cached = _cached(repo_id, filename, what, cache_dir)
    if cached is not None:
        return cached
    if hub_offline():
        raise _not_cached_offline(source, what, where)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except Exception as error:  # a missing repo or file, auth, a dropped connection: all end the same way
        raise fetch_failed(source, what, where, error) from error


def resolve_file(
    source: str | os.PathLike,
    what: str = "adapter",
    where: str = "--adapter",
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A local file as is; else the Hub file ``owner/repo/path/to/file`` from the cache or downloaded.

    what: what the model is for ("adapter"); where: the flag or config key that names it ("--adapter").
    """
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{what} {str(source)!r} is a folder; name the checkpoint file inside it")
    repo_id, filename = split_hub_path(str(source), what)
    if filename is None:
        raise ModelNotFoundError(
            f"{what} {str(source)!r} names a repository, not a file: use owner/repo/file.bin"
        )
    return _download(repo_id, filename, str(source), what, where, cache_dir)


def resolve_folder(
    source: str | os.PathLike,
    what: str,
    where: str,
    *,
    marker: str = "config.json",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[str, str | None]:
    """(path or repo id, subfolder) to give ``from_pretrained(location, subfolder=...)``.

    A local folder comes back as is. A Hub id ``owner/repo[/subfolder]``: offline, the cached snapshot
    folder when ``marker`` (a file every copy of the model has: ``config.json``, ``model_index.json``)
    is cached, else ``ModelNotFoundError`` at once; online, the repo id itself.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelNotFoundError(f"{what} {str(source)!r} is a file; pass the folder that holds the model")
    repo_id, subfolder = split_hub_path(str(source), what)
    if not hub_offline():
        return repo_id, subfolder
    inside = f"{subfolder}/{marker}" if subfolder else marker
    cached = _cached(repo_id, inside, what, cache_dir)
    if cached is None:
        raise _not_cached_offline(str(source), what, where)
    snapshot = cached
    for _ in inside.split("/"):
        snapshot = snapshot.parent
    return str(snapshot), subfolder


def resolve_folder_file(
    source: str | os.PathLike,
    inside: str,
    what: str,
    where: str,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """One file of a model folder (e.g. ``unet/config.json`` of a base model), without the rest.

    source: a local folder or ``owner/repo[/subfolder]``; inside: the file's path within it.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        found = path / inside
        if not found.is_file():
            raise ModelNotFoundError(f"{what} {str(source)!r} has no {inside}: is it the right folder?")
        return found
    if path.exists():
        raise ModelNotFoundError(f"{what} {str(source)!r} is a file; pass the folder that holds the model")
    repo_id, subfolder = split_hub_path(str(source), what)
    filename = f"{subfolder}/{inside}" if subfolder else inside
    return _download(repo_id, filename, str(source), what, where, cache_dir)
