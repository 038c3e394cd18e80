"""Our format (``mipadapter``): safetensors, the projection under diffusers' names, per-layer keys by layer
name, the ``AdapterConfig`` as JSON in the file's metadata (docs/formats.md, "Our format").

Registers the ``mipadapter`` layout (recognised by its metadata), one key table for every architecture (the
keys are the adapter's own module names) and the ``mipadapter`` save format.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from mipadapter.checkpoint import keymaps, layouts
from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.config import AdapterConfig

FORMAT_NAME = "mipadapter"
FORMAT_VERSION = "1"


def _recognise(metadata: Mapping[str, str], keys: Collection[str]) -> bool:
    return metadata.get("format") == FORMAT_NAME


def _file_config(metadata: Mapping[str, str], source: str) -> AdapterConfig:
    if metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is mipadapter format v{metadata.get('format_version')}, this reads v{FORMAT_VERSION}"
        )
    try:
        return AdapterConfig.from_json(metadata["config"])
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise CheckpointError(f"{source}: its adapter config metadata is unreadable ({error})") from None


def _file_metadata(config: AdapterConfig) -> dict[str, str]:
    return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config.to_json()}


def _key_rules(adapter) -> list[keymaps.KeyRule]:
    module_keys = list(adapter.state_dict())
    return keymaps.identity_image_proj_rules(module_keys) + keymaps.named_layer_rules(
        adapter.layer_specs, module_keys
    )


def _check(config: AdapterConfig, path: Path) -> None:
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"the mipadapter format is safetensors: name the file *.safetensors, not {path.name!r}"
        )


layouts.register(
    layouts.Layout(
        FORMAT_NAME,
        description="a mipadapter checkpoint",
        recognise=_recognise,
        file_config=_file_config,
        file_metadata=_file_metadata,
    ),
    layouts.KeyTable(FORMAT_NAME, layouts.ANY_ARCHITECTURE, _key_rules),
    layouts.SaveFormat(FORMAT_NAME, FORMAT_NAME, _check),
)
