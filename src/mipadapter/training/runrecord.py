"""What a training run ran on and which settings it changed on the way: ``<output_dir>/config.json``.

The file holds the run's configuration (the `TrainConfig` sections, as the run uses them now) plus two
keys of its own:

* ``models``: ``{role: identity}`` of the base model, the image encoder and ``adapter_init`` (see
  `mipadapter.provenance`; tiny models by factory, seed and tokenizer hash), found without loading them;
* ``changes``: ``[{"step", "key", "old", "new"}]``, every setting a resume changed with ``--allow-change``,
  at the step it took effect.

A resume (a checkpoint exists) compares both before any model loads: other models are refused; changed
settings are refused in one line naming each key with its old and new value, unless each was allowed —
and only settings the loop can apply at a resumed step may be allowed (`CHANGEABLE`). A run without a
checkpoint yet starts again with whatever it is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mipadapter.provenance import dotted_keys
from mipadapter.training.config import ModelConfig, TrainConfig

__all__ = [
    "CHANGEABLE",
    "RECORD_FILE",
    "check_changes",
    "model_identities",
    "read_record",
    "tiny_identities",
]

RECORD_FILE = "config.json"
# what a resumed step can take up: the optimiser's hyper-parameters, the schedule's length and warmup,
# the dropout, clipping, noise offset and what is written when (model and data settings are fixed by the
# checkpoint's weights and the built index)
CHANGEABLE = (
    "optim.learning_rate",
    "optim.weight_decay",
    "optim.adam_beta1",
    "optim.adam_beta2",
    "optim.adam_epsilon",
    "optim.lr_schedule",
    "optim.warmup_steps",
    "optim.max_steps",
    "optim.max_grad_norm",
    "optim.drop_text",
    "optim.drop_image",
    "optim.drop_both",
    "optim.noise_offset",
    "optim.gradient_checkpointing",
    "run.checkpoint_every",
    "run.keep_last",
    "run.log_every",
    "validation.",
    "export.",
)
# settings that change nothing a run computes: they follow the call without a record
FREE = (
    "data.num_workers",
    "data.scan_workers",
    "data.warn_skipped_share",  # (where the config has it) when to warn about skipped images
    "run.progress_bar",
    "run.tensorboard",
    "run.resume",
)


def _changeable(key: str) -> bool:
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in CHANGEABLE)


def read_record(output_dir: str | Path) -> dict[str, Any] | None:
    """The run record of ``output_dir`` (None when there is none)."""
    path = Path(output_dir) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{path} is not readable JSON ({error}): restore it or use a new run.output_dir") from None


def check_changes(
    output_dir: str | Path, recorded: Mapping[str, Any], config: TrainConfig, allowed: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The settings of ``config`` that differ from the ``recorded`` run's, as ``[{"key", "old", "new"}]``.

    Refuses, in one line, changes not in ``allowed`` (naming every such key with its old and new value),
    and allowed ones the loop cannot apply at a resumed step; an allowed key that did not change is named
    too (a typo would otherwise pass unnoticed)."""
    old = dotted_keys({k: v for k, v in recorded.items() if k not in ("models", "changes")})
    new = dotted_keys(config.to_dict())
    changed = [
        {"key": key, "old": old.get(key), "new": new.get(key)}
        for key in sorted(set(old) | set(new))
        if key not in FREE and _plain(old.get(key)) != _plain(new.get(key))
    ]
    allowed = list(dict.fromkeys(allowed))
    names = {c["key"] for c in changed}
    refused = [c for c in changed if c["key"] not in allowed]
    if refused:
        details = "; ".join(f"{c['key']}: {c['old']!r} → {c['new']!r}" for c in refused)
        raise ValueError(
            f"run.output_dir {str(output_dir)!r} holds a run with other settings ({details}): restore them, "
            f"allow them with --allow-change KEY (from the step it resumes at), or use a new run.output_dir"
        )
    fixed = [c for c in changed if not _changeable(c["key"])]
    if fixed:
        c = fixed[0]
        raise ValueError(
            f"--allow-change {c['key']}: a run cannot change it ({c['old']!r} → {c['new']!r}; the checkpoint's "
            "weights and the built index depend on it): use a new run.output_dir"
        )
    unchanged = [key for key in allowed if key not in names]
    if unchanged:
        raise ValueError(
            f"--allow-change {unchanged[0]}: that setting is the same as the run's ({old.get(unchanged[0])!r})"
            if unchanged[0] in old
            else f"--allow-change {unchanged[0]}: no such setting"
        )
    return changed


def _plain(value: Any) -> Any:
    """JSON's view of a value (a tuple read back is a list)."""
    return json.loads(json.dumps(value))


def model_identities(model: ModelConfig) -> dict[str, dict[str, Any]]:
    """``{role: identity}`` of the models ``model`` names, found without loading them: files hashed, local
    folders fingerprinted, Hub ids by the commit their cached config resolves to (or fetched)."""
    from mipadapter.hub import looks_local, resolve_file, resolve_folder_file
    from mipadapter.provenance import source_identity

    marker = resolve_folder_file(model.base_model, "model_index.json", "base model", "model.base_model")
    found = {"base_model": source_identity(model.base_model, marker.parent, folder_marker=marker)}
    marker = resolve_folder_file(model.image_encoder, "config.json", "image encoder", "model.image_encoder")
    found["image_encoder"] = source_identity(model.image_encoder, marker.parent, folder_marker=marker)
    if model.adapter_init is not None:
        if looks_local(model.adapter_init) and not Path(model.adapter_init).expanduser().exists():
            raise FileNotFoundError(f"model.adapter_init {model.adapter_init!r} does not exist")
        path = resolve_file(model.adapter_init, "adapter to start from", "model.adapter_init")
        found["adapter_init"] = source_identity(model.adapter_init, path)
    return found


def tiny_identities(arch: str, projection: str, seed: int, adapter_init: bool) -> dict[str, dict[str, Any]]:
    """The identities of ``--tiny`` training's models: factory, seed and the tokenizer's hash."""
    from mipadapter.provenance import tokenizer_identity
    from mipadapter.testing import build_clip_tokenizer

    found: dict[str, dict[str, Any]] = {
        "base_model": {"tiny": arch, "seed": seed, "tokenizer": tokenizer_identity(build_clip_tokenizer())},
        "image_encoder": {"tiny": f"{arch} {projection} image encoder", "seed": seed},
    }
    if adapter_init:
        found["adapter_init"] = {"tiny": f"{arch} {projection} ip-adapter", "seed": seed}
    return found
