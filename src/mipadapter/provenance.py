"""What a run ran on, and the refusal to resume it with anything else (layer 0).

A run folder (``eval``; later ``train`` and ``data build``) records each model it uses as a small JSON
*identity*, and a later call on the same folder compares the identities it is about to use with the
recorded ones before any model loads:

* a checkpoint **file** (an adapter, a converted file): its absolute path and the SHA-256 of its bytes;
* a model **folder** (a base model, an image encoder): its absolute path and a fingerprint — SHA-256 over
  every file's relative name and size, and over the bytes of its small text files (configs, tokenizer
  vocabularies and merges), so that another model or another tokenizer in the same place is seen
  without hashing gigabytes of weights;
* a **Hub id**: the id and, when it resolved from the local Hugging Face cache, the commit it resolved
  to (``revision``), plus the SHA-256 (file) or fingerprint (folder) of the cached copy;
* a **tiny** model: the factory's name and seed, and the identity of its tokenizer (the tests' fallback
  vocabulary and CLIP's real BPE give different images for the same recipe).

``tokenizer_identity`` is a hash of a tokenizer's vocabulary, merges and normalisation (not of its
run-time truncation or padding state), used for tiny models and recorded in PNG recipes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RunMismatchError",
    "check_same_models",
    "describe_identity",
    "dotted_keys",
    "file_sha256",
    "folder_fingerprint",
    "source_identity",
    "tokenizer_identity",
]

TEXT_SUFFIXES = (".json", ".txt", ".model", ".yaml", ".yml")  # configs and tokenizer files: hashed whole
TEXT_MAX_BYTES = 64 * 2**20  # a tokenizer.json is a few MB; anything larger is a weight file


class RunMismatchError(ValueError):
    """A run folder was made with other models than this call gives; the message names the first one."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """Hex SHA-256 over every file of ``folder`` (recursively, in sorted order): its relative name and
    size, and the bytes of its small text files (configs, vocabularies, merges)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        if path.suffix in TEXT_SUFFIXES and size <= TEXT_MAX_BYTES:
            digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _hub_revision(resolved: Path) -> str | None:
    """The commit a path in the Hugging Face cache belongs to (``.../snapshots/<commit>/...``), else None."""
    parts = resolved.parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def source_identity(
    source: str | os.PathLike, resolved: str | os.PathLike, *, folder_marker: str | os.PathLike | None = None
) -> dict[str, Any]:
    """The identity of one model: ``source`` as the user gave it (a Hub id or a path) and ``resolved``,
    the local file or folder it was resolved to (`mipadapter.hub`). folder_marker: for a Hub folder, the
    one cached file of it that was fetched (its config), whose place in the cache names the commit."""
    given = str(source)
    local = Path(given).expanduser()
    identity: dict[str, Any] = {"source": str(local.resolve()) if local.exists() else given}
    # absolute, not resolve(): the cache's snapshot files are links into blobs/, which hide the commit
    revision = _hub_revision(Path(folder_marker if folder_marker is not None else resolved).expanduser().absolute())
    if revision is not None:
        identity["revision"] = revision
    resolved = Path(resolved).expanduser()
    if resolved.is_file():
        identity["sha256"] = file_sha256(resolved)
    elif revision is None:  # a local folder; a Hub folder is named by its commit (only its config is here)
        identity["fingerprint"] = folder_fingerprint(resolved)
    return identity


def tokenizer_identity(tokenizer: Any) -> str:
    """A 16-hex hash of what decides a tokenizer's ids: vocabulary, merges, normalisation and
    pre-tokenisation, special tokens. Run-time truncation and padding settings are left out."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = {"vocab": sorted(tokenizer.get_vocab().items())}
    state["special"] = {
        name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token")
    }
    text = json.dumps(state, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_identity(identity: Mapping[str, Any] | None) -> str:
    """One short phrase for an identity, as the refusals print it."""
    if identity is None:
        return "nothing recorded"
    if "tiny" in identity:
        text = f"tiny {identity['tiny']}"
        if identity.get("adapter"):
            text += f" with {describe_identity(identity['adapter'])}"
        return text + (f" (tokenizer {identity['tokenizer']})" if identity.get("tokenizer") else "")
    text = str(identity.get("source"))
    if identity.get("revision"):
        text += f"@{identity['revision'][:12]}"
    if identity.get("sha256"):
        text += f" (sha256 {identity['sha256'][:12]}…)"
    elif identity.get("fingerprint"):
        text += f" (fingerprint {identity['fingerprint'][:12]}…)"
    return text


def check_same_models(folder: str | os.PathLike, recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> None:
    """Refuse, in one line, a call whose models (``{role: identity}``, roles such as ``mip.adapter``)
    differ from those ``folder`` records: the line names the role, the recorded model and the given one."""
    if recorded is None:
        raise RunMismatchError(
            f"run folder {str(folder)!r} records no models (it was made by an older version): use another folder"
        )
    for role in sorted(set(recorded) | set(current)):
        old, new = recorded.get(role), current.get(role)
        if old != new:
            what = role.replace(".", " ").replace("_", " ")
            raise RunMismatchError(
                f"run folder {str(folder)!r} was made with {what} {describe_identity(old)}, "
                f"this call gives {describe_identity(new)}"
            )


def dotted_keys(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested settings mapping as ``{"optim.learning_rate": value, ...}``: how a run record's settings
    are compared key by key and named in a refusal."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
