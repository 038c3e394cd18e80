"""Hub ids and local paths: ``owner/repo/path/inside`` names a file or folder of a Hub repository."""

from __future__ import annotations

from pathlib import Path


class ModelNotFoundError(FileNotFoundError):
    """A model could be found neither on disk nor on the Hub; the message says how to point at a copy."""


def split_hub_path(source: str) -> tuple[str, str | None]:
    """``owner/repo/sub/path`` → (``owner/repo``, ``sub/path`` or None)."""
    parts = source.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelNotFoundError(
            f"{source!r} is neither an existing local path nor a Hub id like owner/repo[/path]"
        )
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _not_found(source: str, what: str, flag: str, error: Exception) -> ModelNotFoundError:
    detail = (str(error).splitlines() or ["no detail"])[0]
    if len(detail) > 160:
        detail = detail[:157] + "…"
    return ModelNotFoundError(
        f"could not fetch the {what} {source!r} from the Hugging Face Hub ({type(error).__name__}: {detail}); "
        f"download it where you have network and pass its local path with {flag}"
    )


def resolve_file(source: str | Path, what: str = "adapter", flag: str = "--adapter") -> Path:
    """A local file path as is, else download ``owner/repo/path/to/file`` from the Hub (cached)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{what} {str(source)!r} is a folder; name the checkpoint file inside it")
    repo_id, filename = split_hub_path(str(source))
    if filename is None:
        raise ModelNotFoundError(
            f"{what} {str(source)!r} names a repository, not a file: use owner/repo/file.bin"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as error:  # offline, missing repo or file, auth: all end the same way for the user
        raise _not_found(str(source), what, flag, error) from error


def resolve_folder(source: str | Path, what: str, flag: str) -> tuple[str, str | None]:
    """(path or repo id, subfolder) for ``from_pretrained``; checks local folders, leaves hub ids as they are."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path), None
    if path.exists():
        raise ModelNotFoundError(f"{what} {str(source)!r} is a file; pass the folder that holds the model")
    return split_hub_path(str(source))


def fetch_failed(source: str, what: str, flag: str, error: Exception) -> ModelNotFoundError:
    """The error to raise when ``from_pretrained`` of a Hub id fails."""
    return _not_found(source, what, flag, error)
