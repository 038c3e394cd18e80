"""Reading and writing adapter checkpoints in every supported layout, strictly.

Layouts:
* ``mipadapter`` (ours): safetensors, projection under diffusers' names, per-layer keys by layer name,
  the ``AdapterConfig`` as JSON in the file's metadata;
* ``authors``: the MIP-Adapter release — h94's layout plus ``{k}.text_to_weight.weight``;
* ``diffusers``: h94's IP-Adapter layout without the text weight, which diffusers' ``load_ip_adapter``
  reads.
The h94-style layouts are written as a nested ``.bin`` (``torch.save``) or flat prefixed ``.safetensors``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mipadapter.checkpoint import convert, keymaps
from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.checkpoint.hub import resolve_file
from mipadapter.config import AdapterConfig
from mipadapter.fileio import atomic_write
from mipadapter.modeling.adapter import MIPAdapter, cross_attention_layers

FORMAT_NAME = "mipadapter"
FORMAT_VERSION = "1"
SAVE_FORMATS = ("mipadapter", "authors", "diffusers")


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """A checkpoint read from disk: its layout, config (when the file carries one) and flat tensors."""

    layout: str  # "mipadapter" or "h94" (h94 covers the authors' files, which add text_to_weight)
    state: dict[str, torch.Tensor]
    config: AdapterConfig | None


def read_file(path: str | Path) -> AdapterFile:
    """Read any supported checkpoint file. Pickled files load with ``weights_only=True``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
        if metadata.get("format") == FORMAT_NAME:
            if metadata.get("format_version") != FORMAT_VERSION:
                raise CheckpointError(
                    f"{path} is mipadapter format v{metadata.get('format_version')}, this reads v{FORMAT_VERSION}"
                )
            return AdapterFile(FORMAT_NAME, state, AdapterConfig.from_json(metadata["config"]))
        return AdapterFile("h94", state, None)
    if suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            nested = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"{path} could not be read as a weights-only PyTorch file: {error}"
            ) from error
        return AdapterFile("h94", convert.flatten_nested(nested), None)
    raise CheckpointError(f"{path}: unsupported checkpoint extension {suffix!r} (use .safetensors or .bin)")


def _rules(adapter: MIPAdapter, layout: str) -> list[keymaps.KeyRule]:
    if layout == FORMAT_NAME:
        return keymaps.identity_image_proj_rules(adapter.state_dict()) + keymaps.named_layer_rules(
            adapter.layer_specs, adapter.config
        )
    return keymaps.image_proj_rules(adapter.config) + keymaps.h94_layer_rules(
        adapter.layer_specs, adapter.config
    )


def load_adapter(source: str | Path, unet: nn.Module, default_scale: float | None = None) -> MIPAdapter:
    """Build the adapter a checkpoint describes for ``unet`` and load its weights strictly.

    source: a local file or a Hub file ``owner/repo/path/file``. default_scale: the image scale to use
    when a subject gives none, for files that carry no config of their own (h94 and the authors'
    files; ours keep the scale they were saved with). A missing, unexpected or mis-shaped key raises a
    ``CheckpointError`` that lists them.
    """
    path = resolve_file(source)
    loaded = read_file(path)
    config = loaded.config
    if config is None:
        config = convert.infer_h94_config(loaded.state)
        if default_scale is not None:
            config = dataclasses.replace(config, default_scale=float(default_scale))
    adapter = MIPAdapter(config, cross_attention_layers(unet))
    load_state(adapter, loaded, str(path))
    return adapter


def load_state(adapter: MIPAdapter, loaded: AdapterFile, source: str) -> None:
    """Copy a read checkpoint into ``adapter`` after checking every key and shape."""
    rules = _rules(adapter, loaded.layout)
    module_shapes = {key: tuple(value.shape) for key, value in adapter.state_dict().items()}
    convert.check_keys(source, loaded.state, convert.external_shapes(rules, module_shapes))
    adapter.load_state_dict(convert.to_modules(loaded.state, rules), strict=True)


def adapter_state(adapter: MIPAdapter, layout: str) -> dict[str, torch.Tensor]:
    """Flat external state of ``adapter`` in ``layout`` (``mipadapter`` or ``h94``)."""
    state = {key: value.detach().cpu().contiguous() for key, value in adapter.state_dict().items()}
    return convert.from_modules(state, _rules(adapter, layout))


def save_adapter(adapter: MIPAdapter, path: str | Path, format: str = FORMAT_NAME) -> Path:
    """Write ``adapter`` to ``path`` atomically (temp file then rename).

    format: ``mipadapter`` (safetensors only), ``authors`` (with text_to_weight) or ``diffusers``
    (plain IP-Adapter, text weight dropped); the last two as ``.bin`` or ``.safetensors``.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose one of {SAVE_FORMATS}")
    path = Path(path)
    suffix = path.suffix.lower()
    if format == FORMAT_NAME and suffix != ".safetensors":
        raise ValueError(
            f"the mipadapter format is safetensors: name the file *.safetensors, not {path.name!r}"
        )
    if suffix not in (".safetensors", ".bin"):
        raise ValueError(f"save to a .safetensors or .bin file, not {path.name!r}")
    if format == "authors" and not adapter.config.text_weight:
        raise ValueError("the authors' layout carries text_to_weight, which this adapter does not have")
    layout = FORMAT_NAME if format == FORMAT_NAME else "h94"
    state = adapter_state(adapter, layout)
    if format == "diffusers":
        state = {key: value for key, value in state.items() if not key.endswith(keymaps.TEXT_WEIGHT_PARAM)}
    atomic_write(path, lambda tmp: _write(tmp, state, suffix, adapter.config if layout == FORMAT_NAME else None))
    return path


def _write(path: Path, state: Mapping[str, torch.Tensor], suffix: str, config: AdapterConfig | None) -> None:
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        metadata = {"format": "pt"}
        if config is not None:
            metadata.update(format=FORMAT_NAME, format_version=FORMAT_VERSION, config=config.to_json())
        save_file(dict(state), str(path), metadata=metadata)
    else:
        torch.save(convert.nest_flat(state), str(path))


def convert_checkpoint(source: str | Path, destination: str | Path, unet: nn.Module, format: str = FORMAT_NAME) -> Path:
    """Rewrite a checkpoint in another layout, keeping its tensors' dtype and values bit-exactly.

    ``unet`` supplies the layer names and indices (weights are not read, so a UNet built on the ``meta``
    device from its config will do).
    """
    path = resolve_file(source)
    loaded = read_file(path)
    config = loaded.config or convert.infer_h94_config(loaded.state)
    dtype = next(iter(loaded.state.values())).dtype
    adapter = MIPAdapter(config, cross_attention_layers(unet)).to(dtype)
    load_state(adapter, loaded, str(path))
    return save_adapter(adapter, destination, format)
