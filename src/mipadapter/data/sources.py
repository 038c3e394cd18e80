"""Inputs: shards of items, read lazily, with damaged inputs counted instead of raised.

Three layouts:
* "tar": SA-1B shards as distributed, each tar holding `sa_<id>.jpg` + `sa_<id>.json`; one shard per
  tar. Tars are streamed (`tarfile` mode "r|*"), never extracted or seeked.
* "folder": a folder of images (searched recursively), cut into shards of `images_per_shard` files.
* "authors": the authors' released set: `images/<id>.png`, `masks/<id>.png` (instance label map),
  `jsons/<id>.json` (`original_size` [W, H], `text`, `final_masks` entries with `label`, `logit`,
  `box`), cut into shards of `images_per_shard` ids.

A shard's name is stable across runs (tar stem, or layout + first index), which is what makes
per-shard completion records meaningful.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LAYOUTS = ("auto", "tar", "folder", "authors")

# Skip reasons, counted per shard and reported at the end.
CORRUPT_IMAGE = "corrupt_image"
TRUNCATED_MEMBER = "truncated_member"
CORRUPT_JSON = "corrupt_json"
JSON_WITHOUT_OBJECTS = "json_without_objects"
MISSING_FILE = "missing_file"
MISSING_IMAGE = "missing_image"
NO_VALID_OBJECTS = "no_valid_objects"


@dataclass(frozen=True)
class Shard:
    """A unit of work and of resumption.

    name: unique, file-name safe; names the completion record.
    layout: "tar", "folder" or "authors".
    root: the tar file, or the input folder.
    members: for folder shards, image paths relative to root; for authors shards, ids; empty for tars.
    """

    name: str
    layout: str
    root: str
    members: tuple[str, ...] = ()


@dataclass
class Item:
    """One input image and what came with it.

    data: the encoded image when it came out of a tar (else None: read `path`).
    path: the image file, when the image is a file.
    meta: the side JSON (SA-1B annotations, or the authors' record), if any.
    mask_path: the authors' instance label map.
    """

    id: str
    shard: str
    suffix: str
    data: bytes | None = None
    path: str | None = None
    meta: dict[str, Any] | None = None
    mask_path: str | None = None


@dataclass
class SkipLog:
    """Counts of skipped inputs by reason, with the first few offending names of each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    keep: int = 5

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] += 1
        names = self.examples.setdefault(reason, [])
        if len(names) < self.keep:
            names.append(name)

    def merge(self, other: SkipLog) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            names = self.examples.setdefault(reason, [])
            names.extend(other.examples.get(reason, [])[: max(0, self.keep - len(names))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(sorted(self.counts.items())),
            "examples": {k: self.examples[k] for k in sorted(self.examples)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SkipLog:
        return cls(
            counts=Counter(data.get("counts", {})),
            examples={k: list(v) for k, v in data.get("examples", {}).items()},
        )


# --- listing shards ---------------------------------------------------------------------------------


def _is_authors(path: Path) -> bool:
    return all((path / sub).is_dir() for sub in ("images", "masks", "jsons"))


def detect_layout(path: Path) -> str:
    if path.is_file() and ".tar" in path.name:
        return "tar"
    if path.is_dir() and any(p.name.endswith((".tar", ".tar.gz")) for p in path.iterdir()):
        return "tar"
    if path.is_dir() and _is_authors(path):
        return "authors"
    if path.is_dir():
        return "folder"
    raise FileNotFoundError(f"input {str(path)!r} is neither a tar file nor a folder")


def list_shards(
    input_path: str | os.PathLike,
    layout: str = "auto",
    images_per_shard: int = 1000,
    ids: list[str] | None = None,
) -> list[Shard]:
    """The shards of an input, in a fixed order (sorted names), for the given or detected layout.

    ids: for the authors layout, the ids to take (e.g. their selected subset); default all `jsons/*.json`.
    """
    path = Path(input_path)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist")
    if layout == "auto":
        layout = detect_layout(path)
    if layout == "tar":
        tars = (
            [path]
            if path.is_file()
            else sorted(p for p in path.iterdir() if p.name.endswith((".tar", ".tar.gz")))
        )
        if not tars:
            raise ValueError(f"no .tar files in {str(path)!r}")
        names = [p.name.split(".tar")[0] for p in tars]
        duplicates = sorted(n for n, c in Counter(names).items() if c > 1)
        if duplicates:
            raise ValueError(f"tar shards with the same stem in {str(path)!r}: {duplicates}")
        return [Shard(name=n, layout="tar", root=str(p)) for n, p in zip(names, tars, strict=True)]
    if layout == "folder":
        files = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {str(path)!r}")
        return _chunked("files", str(path), files, images_per_shard)
    if not _is_authors(path):
        raise ValueError(f"{str(path)!r} is not in the authors' layout (needs images/, masks/, jsons/)")
    if ids is None:
        ids = sorted(p.stem for p in (path / "jsons").glob("*.json"))
    if not ids:
        raise ValueError(f"no ids to score under {str(path / 'jsons')!r}")
    return _chunked("authors", str(path), list(ids), images_per_shard)


def _chunked(prefix: str, root: str, members: list[str], size: int) -> list[Shard]:
    return [
        Shard(
            name=f"{prefix}_{start // size:05d}",
            layout=prefix if prefix == "authors" else "folder",
            root=root,
            members=tuple(members[start : start + size]),
        )
        for start in range(0, len(members), size)
    ]


def read_id_list(path: str | os.PathLike) -> list[str]:
    """Ids from a plain-text file (one per line) or a JSON list of strings. Pickles are refused: they run code."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if text.startswith("["):
        ids = json.loads(text)
        if not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{path}: a JSON id list must hold strings only")
        return ids
    return [line.strip() for line in text.splitlines() if line.strip()]


# --- reading items ----------------------------------------------------------------------------------


def iter_items(shard: Shard, skips: SkipLog) -> Iterator[Item]:
    """The items of a shard, in a fixed order; unreadable parts are counted in `skips`, not raised."""
    if shard.layout == "tar":
        yield from _tar_items(shard, skips)
    elif shard.layout == "folder":
        for member in shard.members:
            item_id = member.rsplit(".", 1)[0]
            yield Item(
                id=item_id,
                shard=shard.name,
                suffix=Path(member).suffix.lower(),
                path=os.path.join(shard.root, member),
            )
    elif shard.layout == "authors":
        yield from _authors_items(shard, skips)
    else:
        raise ValueError(f"unknown shard layout {shard.layout!r}")


def _parse_json(data: bytes, name: str, skips: SkipLog) -> dict[str, Any] | None:
    try:
        meta = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        skips.add(CORRUPT_JSON, name)
        return None
    if not isinstance(meta, dict):
        skips.add(CORRUPT_JSON, name)
        return None
    return meta


def _tar_items(shard: Shard, skips: SkipLog) -> Iterator[Item]:
    """Pair `<stem>.<image>` with `<stem>.json` in one streaming pass.

    An image is yielded as soon as its JSON has been seen (SA-1B stores the two side by side, so at most
    a pair is buffered); images whose JSON never comes are yielded at the end without one. A truncated
    member ends the shard: a stream cannot be read past it.
    """
    images: dict[str, tuple[str, bytes]] = {}
    metas: dict[str, dict[str, Any] | None] = {}
    truncated = False
    try:
        with tarfile.open(shard.root, mode="r|*") as archive:
            while True:
                member = None
                try:
                    member = archive.next()
                    if member is None:
                        break
                    if not member.isfile():
                        continue
                    stem, _, suffix = Path(member.name).name.rpartition(".")
                    suffix = "." + suffix.lower()
                    if suffix not in IMAGE_SUFFIXES and suffix != ".json":
                        continue
                    handle = archive.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError("unexpected end of data")
                except (tarfile.ReadError, EOFError, OSError):
                    skips.add(TRUNCATED_MEMBER, f"{shard.name}/{member.name if member else '?'}")
                    truncated = True
                    break
                if suffix == ".json":
                    metas[stem] = _parse_json(data, f"{shard.name}/{member.name}", skips)
                else:
                    images[stem] = (suffix, data)
                if stem in images and stem in metas:
                    image_suffix, image_data = images.pop(stem)
                    meta = metas.pop(stem)
                    if meta is not None:  # None: the JSON was corrupt (counted); the pair is not trusted
                        yield Item(id=stem, shard=shard.name, suffix=image_suffix, data=image_data, meta=meta)
    except tarfile.ReadError:
        # the archive's first header is unreadable: nothing in it can be trusted
        skips.add(TRUNCATED_MEMBER, f"{shard.name}/<header>")
        truncated = True
    if not truncated and shard.root.endswith(".tar") and os.path.getsize(shard.root) % 512:
        # tarfile's stream reader takes a header cut short for the end of the archive; a plain tar is
        # always whole 512-byte blocks, so a ragged size means the archive was cut
        skips.add(TRUNCATED_MEMBER, f"{shard.name}/<end of archive>")
    for stem in sorted(metas):
        if metas[stem] is not None and not truncated:  # after a cut, the missing image is the cut member
            skips.add(MISSING_IMAGE, f"{shard.name}/{stem}.json")
    for stem in sorted(images):
        suffix, data = images[stem]
        yield Item(id=stem, shard=shard.name, suffix=suffix, data=data, meta=None)


def _authors_items(shard: Shard, skips: SkipLog) -> Iterator[Item]:
    root = Path(shard.root)
    for item_id in shard.members:
        image, mask, meta_path = (
            root / "images" / f"{item_id}.png",
            root / "masks" / f"{item_id}.png",
            root / "jsons" / f"{item_id}.json",
        )
        missing = [str(p.relative_to(root)) for p in (image, mask, meta_path) if not p.is_file()]
        if missing:
            skips.add(MISSING_FILE, f"{item_id}: {', '.join(missing)}")
            continue
        meta = _parse_json(meta_path.read_bytes(), str(meta_path.relative_to(root)), skips)
        if meta is None:
            continue
        yield Item(
            id=item_id, shard=shard.name, suffix=".png", path=str(image), meta=meta, mask_path=str(mask)
        )


def open_image(item: Item):
    """Decode an item's image fully (RGB), turned upright by its EXIF orientation, refused above the
    pixel limit by its header (`mipadapter.photos`). Raises OSError/ValueError-family errors for corrupt
    or oversized data."""
    from mipadapter.photos import open_photo

    if item.data is None:
        return open_photo(item.path, f"image {item.id}")
    return open_photo(item.data, f"image {item.id} of {item.shard}")  # a member of a tar shard
