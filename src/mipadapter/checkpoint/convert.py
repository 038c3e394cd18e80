"""Pure converters between flat external state dicts and our module state dicts, and the strict key check.

Nothing here knows a layout: the rules come from the key tables (``layouts.KeyTable``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mipadapter.checkpoint.keymaps import KeyRule


class CheckpointError(ValueError):
    """A checkpoint does not match what the adapter expects; the message lists every offending key."""


def _listing(title: str, keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")
    return f"{title}: {shown}"


def check_keys(
    source: str, present: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]
) -> None:
    """Raise a ``CheckpointError`` naming missing, unexpected and mis-shaped keys (all of them at once)."""
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    misshaped = sorted(
        f"{key} {tuple(present[key].shape)} (expected {tuple(expected[key])})"
        for key in set(present) & set(expected)
        if tuple(present[key].shape) != tuple(expected[key])
    )
    problems = [
        _listing(title, keys)
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if keys
    ]
    if problems:
        raise CheckpointError(f"{source} does not fit this adapter — " + "; ".join(problems))


def external_shapes(
    rules: Sequence[KeyRule], module_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The shape each external key must have, derived from the module shapes its rule produces."""
    shapes = {}
    for rule in rules:
        first = tuple(module_shapes[rule.modules[0]])
        shapes[rule.external] = (first[0] * len(rule.modules), *first[1:])
    return shapes


def to_modules(state: Mapping[str, torch.Tensor], rules: Sequence[KeyRule]) -> dict[str, torch.Tensor]:
    """External flat state → module state (keys must already have been checked)."""
    converted = {}
    for rule in rules:
        parts = state[rule.external].chunk(len(rule.modules), dim=0)
        converted.update(zip(rule.modules, parts, strict=True))
    return converted


def from_modules(state: Mapping[str, torch.Tensor], rules: Sequence[KeyRule]) -> dict[str, torch.Tensor]:
    """Module state → external flat state (inverse of ``to_modules``)."""
    return {rule.external: torch.cat([state[key] for key in rule.modules], dim=0) for rule in rules}


def flatten_nested(state: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{"image_proj": {...}, "ip_adapter": {...}}`` → flat keys prefixed ``image_proj.`` / ``ip_adapter.``."""
    expected = {"image_proj", "ip_adapter"}
    if not isinstance(state, Mapping) or set(state) != expected:
        found = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"an IP-Adapter checkpoint holds exactly {sorted(expected)}, found {found}")
    return {f"{group}.{key}": value for group in sorted(expected) for key, value in state[group].items()}


def nest_flat(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of ``flatten_nested``."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        nested[group][rest] = value
    return nested
