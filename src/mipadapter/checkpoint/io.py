"""Reading and writing adapter checkpoints in every registered layout, strictly.

The layouts are records in ``layouts.py``, registered by their modules (``ours.py``, ``h94.py``,
``xlabs.py``); this module reads the files, recognises and checks them through that table and never names
a layout. The layouts registered today:
* ``mipadapter`` (ours): safetensors, projection under diffusers' names, per-layer keys by layer name,
  the ``AdapterConfig`` as JSON in the file's metadata;
* ``authors``: the MIP-Adapter release — h94's layout plus ``{k}.text_to_weight.weight``;
* ``diffusers``: h94's IP-Adapter layout without the text weight, which diffusers' ``load_ip_adapter``
  reads (for FLUX adapters: the keys diffusers' FLUX loader turns XLabs' file into);
* ``xlabs`` (FLUX only): XLabs' published ``ip_adapter.safetensors`` layout.
The h94-style layouts are written as a nested ``.bin`` (``torch.save``) or flat prefixed ``.safetensors``.
Which architecture a file without a config belongs to comes from the model it is loaded onto.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mipadapter.checkpoint import convert, keymaps, layouts
from mipadapter.checkpoint.convert import CheckpointError
from mipadapter.config import AdapterConfig
from mipadapter.fileio import atomic_write
from mipadapter.hub import resolve_file
from mipadapter.modeling.adapter import MIPAdapter, adapter_layers, model_architecture

DEFAULT_FORMAT = "mipadapter"


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """A checkpoint read from disk: its layout, config (when the file carries one) and flat tensors."""

    layout: str  # a registered layout: "mipadapter", "h94" (authors' files, diffusers' FLUX keys too), "xlabs"
    state: dict[str, torch.Tensor]
    config: AdapterConfig | None


def read_file(path: str | Path) -> AdapterFile:
    """Read any supported checkpoint file. Pickled files load with ``weights_only=True``.

    Every failure is a one-line ``CheckpointError`` (or ``FileNotFoundError``) naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        read = _read_safetensors(path)
    elif suffix in (".bin", ".pt", ".pth", ".ckpt"):
        nested = _torch_load(path)
        try:
            state = convert.flatten_nested(nested)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        read = _recognised(path, {}, state)
    else:
        raise CheckpointError(f"{path}: unsupported checkpoint extension {suffix!r} (use .safetensors or .bin)")
    check_weights(str(path), read.state)
    return read


def check_weights(source: str, state: Mapping[str, object]) -> None:
    """Every value a floating-point tensor holding only finite numbers; a ``CheckpointError`` naming
    ``source`` and the first offending key (in sorted order) otherwise. An int8 or bool tensor would be
    cast silently, a NaN would turn every image black."""
    for key in sorted(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: {key} is a {type(value).__name__}, not a tensor")
        if not value.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key} is {str(value.dtype).removeprefix('torch.')}; adapter weights are "
                "floating point (float32, float16, bfloat16)"
            )
    for key in sorted(state):
        if not _finite(state[key]):
            raise CheckpointError(f"{source}: tensor {key} holds NaN or infinite values (the first such key)")


def _finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A sum is finite when every value is (NaN and ±inf propagate), and
    costs a fifth of ``isfinite(...).all()``; only a non-finite sum (or one that overflowed) is checked
    value by value."""
    accumulate = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


def _read_safetensors(path: Path) -> AdapterFile:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own SafetensorError (not an OSError) for bad bytes
        raise CheckpointError(f"{path} is not a readable safetensors file ({_first_line(error)})") from None
    return _recognised(path, metadata, state)


def _recognised(path: Path, metadata: Mapping[str, str], state: dict[str, torch.Tensor]) -> AdapterFile:
    layout = layouts.recognise(metadata, state, str(path))
    config = layout.file_config(metadata, str(path)) if layout.file_config else None
    return AdapterFile(layout.name, state, config)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


_TORCH_ADVICE = ("weights_only", "torch.load", "Check the documentation", "Please file")


def _unpickler_detail(text: str) -> str:
    """The one informative line of torch's weights-only refusal (its advice to unpickle fully dropped)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not any(advice in line for advice in _TORCH_ADVICE)]
    return useful[0] if useful else "unsupported pickle content"


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``; a refusal is reported without torch's advice to unpickle fully
    (wrong advice for a file that may be malicious)."""
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path} holds pickled Python objects, not just tensors, and is refused unread "
                f"(it would import {found.group(1)})"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_unpickler_detail(text)})"
        ) from None
    except (
        Exception
    ) as error:  # truncated zip, garbage bytes (torch raises RuntimeError, KeyError, EOFError …)
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {_first_line(error)})"
        ) from None


def _rules(adapter: MIPAdapter, layout: str) -> list[keymaps.KeyRule]:
    return layouts.key_table(layout, adapter.config.architecture).key_rules(adapter)


def check_adapter_file(
    path: str | Path,
    unet: nn.Module,
    default_scale: float | None = None,
    *,
    loaded: AdapterFile | None = None,
) -> AdapterFile:
    """Read a checkpoint file and check every key and shape against ``unet``, without building weights.

    ``unet`` supplies only layer names, indices and widths, so a UNet built on the ``meta`` device from
    its ``config.json`` will do: the file can be refused before the base model is loaded. Returns the file
    with its ``config`` filled in (read off the shapes for h94/authors files, which then take
    ``default_scale``). loaded: the file as ``read_file`` returned it, when it was read already (so it is
    read once). Raises ``CheckpointError`` naming the file and every offending key.
    """
    loaded = loaded if loaded is not None else read_file(path)
    config = loaded.config
    architecture = model_architecture(unet)
    misplaced = layouts.misfit(loaded.layout, architecture)
    if misplaced is not None:
        raise CheckpointError(
            f"{path} is {misplaced.description} file, which does not fit {type(unet).__name__}: load it "
            f"onto a {misplaced.home or 'different'} pipeline"
        )
    if config is None:
        table = layouts.key_table(loaded.layout, architecture)
        if table.infer_config is None:
            raise CheckpointError(f"{path}: a {loaded.layout} file carries its adapter config, and this one has none")
        config = table.infer_config(loaded.state, str(path))
        if default_scale is not None:
            config = dataclasses.replace(config, default_scale=float(default_scale))
    try:
        layers = adapter_layers(unet, config)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            skeleton = MIPAdapter(config, layers)
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    rules = _rules(skeleton, loaded.layout)  # the layout fits the architecture: misfit said so above
    module_shapes = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    convert.check_keys(str(path), loaded.state, convert.external_shapes(rules, module_shapes))
    return AdapterFile(loaded.layout, loaded.state, config)


def adapter_from_file(checked: AdapterFile, unet: nn.Module, source: str) -> MIPAdapter:
    """Build the adapter of a file ``check_adapter_file`` accepted for ``unet`` and load its weights."""
    adapter = MIPAdapter(checked.config, adapter_layers(unet, checked.config))
    load_state(adapter, checked, source)
    return adapter


def load_adapter(
    source: str | Path, unet: nn.Module, default_scale: float | None = None, *, where: str = "adapter"
) -> MIPAdapter:
    """Build the adapter a checkpoint describes for ``unet`` and load its weights strictly.

    source: a local file or a Hub file ``owner/repo/path/file``. default_scale: the image scale to use
    when a subject gives none, for files that carry no config of their own (h94 and the authors'
    files; ours keep the scale they were saved with). where: how errors name the source (an argument
    name or a CLI flag). A missing, unexpected or mis-shaped key raises a ``CheckpointError`` that
    lists them.
    """
    path = resolve_file(source, "adapter", where)
    return adapter_from_file(check_adapter_file(path, unet, default_scale), unet, str(path))


def load_state(adapter: MIPAdapter, loaded: AdapterFile, source: str) -> None:
    """Copy a read checkpoint into ``adapter`` after checking every key and shape."""
    rules = _rules(adapter, loaded.layout)
    module_shapes = {key: tuple(value.shape) for key, value in adapter.state_dict().items()}
    convert.check_keys(source, loaded.state, convert.external_shapes(rules, module_shapes))
    adapter.load_state_dict(convert.to_modules(loaded.state, rules), strict=True)


def adapter_state(adapter: MIPAdapter, layout: str) -> dict[str, torch.Tensor]:
    """Flat external state of ``adapter`` in a registered ``layout`` (``mipadapter``, ``h94``, ``xlabs`` …)."""
    state = {key: value.detach().cpu().contiguous() for key, value in adapter.state_dict().items()}
    return convert.from_modules(state, _rules(adapter, layout))


def save_adapter(adapter: MIPAdapter, path: str | Path, format: str = DEFAULT_FORMAT) -> Path:
    """Write ``adapter`` to ``path`` atomically (temp file then rename).

    format: ``mipadapter`` (safetensors only), ``authors`` (with text_to_weight) or ``diffusers``
    (plain IP-Adapter, text weight dropped), as ``.bin`` or ``.safetensors``; for FLUX adapters also
    ``xlabs`` (XLabs' published layout, safetensors).
    """
    chosen = layouts.save_format(format)
    path = Path(path)
    chosen.check(adapter.config, path)
    layout = layouts.layout_named(chosen.layout)
    state = adapter_state(adapter, chosen.layout)
    if chosen.keep is not None:
        state = {key: value for key, value in state.items() if chosen.keep(key)}
    metadata = {"format": "pt"}
    if layout.file_metadata is not None:
        metadata.update(layout.file_metadata(adapter.config))
    atomic_write(path, lambda tmp: _write(tmp, state, path.suffix.lower(), metadata))
    return path


def _write(path: Path, state: Mapping[str, torch.Tensor], suffix: str, metadata: dict[str, str]) -> None:
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(state), str(path), metadata=metadata)
    else:
        torch.save(convert.nest_flat(state), str(path))


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    unet: nn.Module,
    format: str = DEFAULT_FORMAT,
    *,
    where: str = "source",
    loaded: AdapterFile | None = None,
    default_scale: float | None = None,
) -> Path:
    """Rewrite a checkpoint in another layout, keeping its tensors' dtype and values bit-exactly.

    ``unet`` supplies the layer names and indices (weights are not read, so a UNet built on the ``meta``
    device from its config will do). where: how errors name ``source``; loaded: ``read_file(source)``
    when the caller has read it already; default_scale: the image scale our format stores for a source
    that carries none (h94, the authors', XLabs' files: 1.0 when None; the presets use 0.75 for the authors'
    ``model_sdxl.bin``, 0.65 for ``model_sdxl_plus.bin``).
    """
    path = resolve_file(source, "checkpoint", where)
    checked = check_adapter_file(path, unet, default_scale, loaded=loaded)
    dtype = next(iter(checked.state.values())).dtype
    adapter = MIPAdapter(checked.config, adapter_layers(unet, checked.config)).to(dtype)
    load_state(adapter, checked, str(path))
    return save_adapter(adapter, destination, format)
