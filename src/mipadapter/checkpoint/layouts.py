"""The table of checkpoint layouts: what each layout module registers, and the look-ups the generic code makes.

A layout is one way of naming an adapter's tensors in a file (``mipadapter``, ``h94``, ``xlabs``). Each
layout module (``checkpoint/ours.py``, ``checkpoint/h94.py``, ``checkpoint/xlabs.py``) fills this table when
it is imported, and the package ``__init__`` imports every one of them, so the table is complete before any
caller can use it. ``io.py`` reads and writes through the table and never names a layout; a new layout is one
module that registers its records, plus its import in ``__init__``.

Three records:

* ``Layout`` — a file's layout: how a file is recognised, the config the file carries, what it writes
  beside its tensors;
* ``KeyTable`` — how one layout's keys map onto an adapter of one architecture (``AdapterConfig.architecture``)
  and how an adapter's config is read off such a file's shapes. ``h94`` has two: UNets (h94's own file) and
  FLUX (the keys diffusers' FLUX loader makes of XLabs' file), registered by different modules;
* ``SaveFormat`` — a name ``save_adapter`` and ``mipadapter convert --to`` accept, and the layout it writes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.checkpoint.keymaps import KeyRule
from mipadapter.config import AdapterConfig

if TYPE_CHECKING:
    from mipadapter.modeling.adapter import MIPAdapter

ANY_ARCHITECTURE = "*"


@dataclass(frozen=True)
class Layout:
    """One file layout.

    name: what ``AdapterFile.layout`` says. description: how refusals name such a file ("an XLabs FLUX
    IP-Adapter"). home: the models a refusal sends a misplaced file to ("FLUX.1"). recognise(metadata,
    keys): whether a file with this safetensors metadata and these flat keys is in this layout; None for
    the one layout a file nobody claims is read as (the h94 family, which carries no marker). file_config
    (metadata, source): the ``AdapterConfig`` the file carries, or None when it carries none (then a
    ``KeyTable`` reads it off the shapes). file_metadata(config): the safetensors metadata a written file
    carries beside ``{"format": "pt"}``.
    """

    name: str
    description: str
    home: str = ""
    recognise: Callable[[Mapping[str, str], Collection[str]], bool] | None = None
    file_config: Callable[[Mapping[str, str], str], AdapterConfig] | None = None
    file_metadata: Callable[[AdapterConfig], dict[str, str]] | None = None


@dataclass(frozen=True)
class KeyTable:
    """A layout's keys on one architecture.

    key_rules(adapter): every external key ↔ module keys of ``adapter`` (``keymaps.KeyRule``).
    infer_config(state, source): the ``AdapterConfig`` read off a flat state's shapes, for files that carry
    none; every refusal a one-line ``CheckpointError`` naming ``source``. architecture: an
    ``AdapterConfig.architecture``, or ``ANY_ARCHITECTURE`` when the rules come from the adapter itself.
    """

    layout: str
    architecture: str
    key_rules: Callable[[MIPAdapter], list[KeyRule]]
    infer_config: Callable[[Mapping[str, torch.Tensor], str], AdapterConfig] | None = None


@dataclass(frozen=True)
class SaveFormat:
    """A format ``save_adapter`` writes: its ``layout``, ``check(config, path)`` raising a one-line
    ``ValueError`` when this adapter or file name cannot be written so (suffixes included), and ``keep(key)``
    saying which external keys the file holds (None: all)."""

    name: str
    layout: str
    check: Callable[[AdapterConfig, Path], None]
    keep: Callable[[str], bool] | None = None


_LAYOUTS: dict[str, Layout] = {}
_KEY_TABLES: dict[tuple[str, str], KeyTable] = {}
_SAVE_FORMATS: dict[str, SaveFormat] = {}


def register(*records: Layout | KeyTable | SaveFormat) -> None:
    """Add records to the table; a name (or layout × architecture) registered twice is a programming error."""
    for record in records:
        if isinstance(record, Layout):
            table, key = _LAYOUTS, record.name
            fallbacks = [layout.name for layout in _LAYOUTS.values() if layout.recognise is None]
            if record.recognise is None and fallbacks:
                raise ValueError(f"layout {record.name!r}: {fallbacks[0]!r} already reads the unclaimed files")
        elif isinstance(record, KeyTable):
            table, key = _KEY_TABLES, (record.layout, record.architecture)
        elif isinstance(record, SaveFormat):
            table, key = _SAVE_FORMATS, record.name
        else:
            raise TypeError(f"not a layout record: {record!r}")
        if key in table:
            raise ValueError(f"{type(record).__name__} {key!r} is registered already")
        table[key] = record


def unregister(layout: str) -> None:
    """Remove a layout with its key tables and save formats (for tests that register a layout of their own)."""
    _LAYOUTS.pop(layout, None)
    for key in [key for key in _KEY_TABLES if key[0] == layout]:
        del _KEY_TABLES[key]
    for name in [name for name, fmt in _SAVE_FORMATS.items() if fmt.layout == layout]:
        del _SAVE_FORMATS[name]


def layout_named(name: str) -> Layout:
    if name not in _LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {name!r}; the layouts are {sorted(_LAYOUTS)}")
    return _LAYOUTS[name]


def recognise(metadata: Mapping[str, str], keys: Collection[str], source: str) -> Layout:
    """The layout of a file with this safetensors ``metadata`` (empty for pickles) and these flat ``keys``:
    the one layout that claims it, else the layout that reads unclaimed files."""
    keys = list(keys)
    claims = [layout for layout in _LAYOUTS.values() if layout.recognise and layout.recognise(metadata, keys)]
    if len(claims) > 1:
        raise CheckpointError(f"{source} fits several checkpoint layouts ({', '.join(c.name for c in claims)})")
    if claims:
        return claims[0]
    fallback = [layout for layout in _LAYOUTS.values() if layout.recognise is None]
    if not fallback:
        raise CheckpointError(f"{source} is in no known checkpoint layout (the layouts are {sorted(_LAYOUTS)})")
    return fallback[0]


def misfit(layout: str, architecture: str) -> Layout | None:
    """The ``Layout`` of a file in ``layout`` when it has no key table for ``architecture`` (for the refusal
    that names it), None when it fits."""
    found = layout_named(layout)
    fits = (layout, architecture) in _KEY_TABLES or (layout, ANY_ARCHITECTURE) in _KEY_TABLES
    return None if fits else found


def key_table(layout: str, architecture: str) -> KeyTable:
    """The key table of ``layout`` on ``architecture``; a ``CheckpointError`` saying where such files go."""
    misplaced = misfit(layout, architecture)
    if misplaced is not None:
        raise CheckpointError(
            f"{misplaced.description} file does not fit a {architecture} adapter: load it onto a "
            f"{misplaced.home or 'different'} pipeline"
        )
    return _KEY_TABLES.get((layout, architecture)) or _KEY_TABLES[(layout, ANY_ARCHITECTURE)]


def save_format(name: str) -> SaveFormat:
    if name not in _SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; choose one of {save_format_names()}")
    return _SAVE_FORMATS[name]


def save_format_names() -> tuple[str, ...]:
    """Every format ``save_adapter`` writes, sorted (so no import order shows)."""
    return tuple(sorted(_SAVE_FORMATS))


def check_container(path: Path) -> None:
    """The files any format is written as: safetensors, or a pickled ``.bin`` of the nested h94 form."""
    if path.suffix.lower() not in (".safetensors", ".bin"):
        raise ValueError(f"save to a .safetensors or .bin file, not {path.name!r}")
