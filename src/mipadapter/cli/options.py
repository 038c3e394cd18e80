"""Argument helpers shared by the CLI's sub-commands (and the web shell): parsing, checking, model loading.

Everything here that checks runs before any model is loaded; errors are one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mipadapter import limits
from mipadapter.alignment import subject_labels
from mipadapter.config import ADAPTER_NAME, DEFAULT_ADAPTER
from mipadapter.limits import SEED_RANGE  # noqa: F401  (the CLI's name for it)
from mipadapter.recipe import AdapterRecord, ModelRecord

MODEL_FLAGS = {"base_model": "--base-model", "adapter": "--adapter", "image_encoder": "--image-encoder"}
TINY_ADAPTER = "built-in tiny (random)"
VAE_FACTOR = 8  # SD1.5 and SDXL pixel sides per latent side
FLUX_CELL = 16  # FLUX.1: the VAE's factor 8 times the transformer's 2×2 latent patches
ONE_ADAPTER_ON_FLUX = "adapters are added on SDXL and SD1.5; a FLUX pipeline holds one (XLabs')"


@dataclass(frozen=True)
class TinyArch:
    """One built-in tiny architecture of ``--tiny ARCH``: offline random models with the real structure."""

    name: str
    vae_factor: int  # output sides are multiples of this: the pixel side of one cell of the latent grid
    native_side: int  # output side when --height/--width are not given
    family: str = "unet"  # "unet" or "flux" (which guidance flags apply)


TINY_ARCHS = {
    "sdxl": TinyArch("sdxl", vae_factor=8, native_side=64),
    "sd15": TinyArch("sd15", vae_factor=8, native_side=64),
    "flux": TinyArch("flux", vae_factor=FLUX_CELL, native_side=64, family="flux"),
}
"""``--tiny`` choices (``--tiny`` alone is ``sdxl``); a new architecture is one more row."""
DEFAULT_TINY = "sdxl"


def add_model_flags(parser) -> None:
    """``--base-model``, ``--adapter``, ``--image-encoder`` (each defaulting to the preset's), the same
    for every command that loads a MIP pipeline (``generate`` and ``web``). ``--adapter NAME=FILE`` and
    ``--image-encoder NAME=DIR`` add named adapters beside the default one (docs/adapters.md)."""
    parser.add_argument(
        "--base-model", help="diffusers base model: Hub id or local folder (default: the preset's)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]FILE",
        help="adapter checkpoint: local file or owner/repo/path/file; NAME=FILE adds another adapter under "
        "NAME (repeatable; NAME=PRESET takes a preset's adapter and encoder, e.g. face=ip-sdxl-plus-face) "
        "for the subjects --subject-adapter gives it, SDXL and SD1.5 only (default: the preset's, no added "
        "adapters)",
    )
    parser.add_argument(
        "--image-encoder",
        action="append",
        metavar="[NAME=]DIR",
        help="CLIP image encoder: local folder or owner/repo/subfolder; NAME=DIR the encoder of the adapter "
        "added as NAME (default: the preset's; an added adapter's: a loaded one that gives its features, "
        "with --tiny the tiny encoder of its kind)",
    )


def add_tiny_argument(parser, purpose: str) -> None:
    """``--tiny [ARCH]`` on a command's parser (one definition for every command that offers it)."""
    parser.add_argument(
        "--tiny",
        nargs="?",
        const=DEFAULT_TINY,
        choices=sorted(TINY_ARCHS),
        metavar="ARCH",
        help=f"built-in tiny random models, offline ({purpose}): ARCH is one of {', '.join(sorted(TINY_ARCHS))} "
        f"({DEFAULT_TINY} for --tiny alone); an --adapter given with it is loaded onto the tiny models "
        "(default: off, the preset's models)",
    )


def tiny_arch(value) -> str | None:
    """``args.tiny`` as an architecture name: None (not tiny), True (a ``store_true`` flag) → the default."""
    if value in (None, False):
        return None
    return DEFAULT_TINY if value is True else str(value)


# ----------------------------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Keyed:
    """``NAME=VALUE`` or ``NAME#K=VALUE`` (the K-th subject called NAME, from 1)."""

    name: str
    occurrence: int | None
    value: str

    @property
    def label(self) -> str:
        return self.name if self.occurrence is None else f"{self.name}#{self.occurrence}"


_OCCURRENCE = re.compile(r"^(?P<name>.+?)#(?P<k>\d+)$")


def parse_keyed(values: Sequence[str], flag: str, *, occurrences: bool = True) -> list[Keyed]:
    """``["cat=a", "dog#2=b"]`` → ``Keyed`` items (split at the first '='; names may hold spaces)."""
    parsed = []
    for value in values:
        name, sep, rest = value.partition("=")
        name, rest = name.strip(), rest.strip()
        if not sep or not name or not rest:
            form = "NAME=VALUE or NAME#K=VALUE" if occurrences else "NAME=VALUE"
            raise ValueError(f"{flag} takes {form}, got {value!r}")
        match = _OCCURRENCE.match(name) if occurrences else None
        if match:
            if int(match["k"]) < 1:
                raise ValueError(f"{flag} {value!r}: subjects are counted from #1")
            parsed.append(Keyed(match["name"].strip(), int(match["k"]), rest))
        else:
            parsed.append(Keyed(name, None, rest))
    return parsed


def address(items: Sequence[Keyed], names: Sequence[str], flag: str) -> dict[int, str]:
    """Subject index → value: ``NAME`` addresses every subject of that name, ``NAME#K`` the K-th one.

    Raises for a name no ``--subject`` gives, an occurrence beyond the subjects of that name, or one
    subject addressed twice.
    """
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(names):  # labels as the pipeline's subject_labels: "dog", "dog#2"
        positions.setdefault(name, []).append(index)
    chosen: dict[int, str] = {}
    given: dict[int, str] = {}
    for item in items:
        if item.name not in positions:
            raise ValueError(
                f"{flag} {item.label}: no --subject is called {item.name!r} (subjects: {list(names)})"
            )
        found = positions[item.name]
        if item.occurrence is not None and item.occurrence > len(found):
            raise ValueError(
                f"{flag} {item.label}: there {'is' if len(found) == 1 else 'are'} only {len(found)} "
                f"subject{'s' if len(found) > 1 else ''} called {item.name!r}"
            )
        targets = found if item.occurrence is None else [found[item.occurrence - 1]]
        for index in targets:
            if index in chosen:
                raise ValueError(
                    f"{flag} gives subject #{index + 1} {names[index]!r} twice ({given[index]} and {item.label})"
                )
            chosen[index], given[index] = item.value, item.label
    return chosen


@dataclass(frozen=True)
class SubjectArg:
    """One ``--subject``: its name and photo paths (checked to exist and be images by ``open_photos``);
    recorded: the photos come from a ``--from-png`` recipe, not a flag (errors say so)."""

    name: str
    photos: tuple[Path, ...]
    recorded: bool = False


def parse_subjects(values: Sequence[str]) -> list[SubjectArg]:
    """``--subject cat=a.jpg,b.jpg`` (repeatable; the same name twice is two subjects)."""
    subjects = []
    for item in parse_keyed(values, "--subject", occurrences=False):
        photos = tuple(Path(part.strip()).expanduser() for part in item.value.split(",") if part.strip())
        if not photos:
            raise ValueError(f"--subject {item.name}: give at least one photo")
        subjects.append(SubjectArg(item.name, photos))
    return subjects


def parse_scale(
    value: str, label: str, caps: limits.Limits = limits.DEFAULT_LIMITS, allow: str | None = None
) -> float:
    """``--scale NAME=S``'s number, finite, in ``0 … caps.max_scale`` (``allow``: the flag that raises it)."""
    try:
        scale = float(value)
    except ValueError:
        raise ValueError(f"--scale {label}={value}: the scale must be a number") from None
    return limits.check_scale(scale, f"--scale {label}", caps, allow=allow)


def parse_box(value: str, label: str) -> tuple[float, float, float, float] | None:
    """``x0,y0,x1,y1`` → a box (checked: finite, x0 < x1, y0 < y1, not negative); None if not 4 numbers."""
    parts = value.split(",")
    if len(parts) != 4:
        return None
    try:
        box = tuple(float(part) for part in parts)
    except ValueError:
        return None
    x0, y0, x1, y1 = box
    if not all(math.isfinite(v) for v in box) or min(box) < 0 or not (x0 < x1 and y0 < y1):
        raise ValueError(
            f"--region {label}={value}: a box is x0,y0,x1,y1 in pixels with 0 ≤ x0 < x1 and 0 ≤ y0 < y1"
        )
    return box  # type: ignore[return-value]


def check_box_fits(box, label: str, height: int | None, width: int | None) -> None:
    x0, y0, x1, y1 = box
    if (width is not None and x1 > width) or (height is not None and y1 > height):
        raise ValueError(
            f"--region {label}={','.join(f'{v:g}' for v in box)}: the box reaches beyond the {width}×{height} "
            "output (x1 ≤ width, y1 ≤ height)"
        )


# ----------------------------------------------------------------------------------------------- checks
def check_side(value: int | None, flag: str, factor: int) -> int | None:
    if value is not None and (value <= 0 or value % factor):
        why = "the VAE's factor" if factor == VAE_FACTOR else "one latent cell: FLUX packs 2×2 VAE latents"
        raise ValueError(f"{flag} must be a positive multiple of {factor} ({why}), got {value}")
    return value


def check_true_cfg_scale(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise ValueError(f"--true-cfg-scale must be a finite number ≥ 1 (1 is off), got {value}")
    return value


def base_model_kind(models) -> str:
    """``flux`` or ``unet``: the kind of base model ``models`` (``tiny``, ``preset``, ``base_model``) will
    load, known before loading it: the tiny architecture, else the base model's ``model_index.json`` (read
    from its folder or the Hub), else the preset's base model."""
    arch = tiny_arch(getattr(models, "tiny", None))
    if arch is not None:
        return TINY_ARCHS[arch].family
    if getattr(models, "base_model", None):
        from mipadapter.pipeline.loading import denoiser_kind

        return denoiser_kind(models.base_model, "base model", MODEL_FLAGS["base_model"])
    return preset_family(models.preset)


def check_model_flags(args) -> AdapterFlags:
    """``--tiny`` picks the base model and image encoder (an ``--adapter`` loads onto them): the other
    model flags are errors with it (an added adapter's ``--image-encoder NAME=DIR`` is not). Returns the
    adapter flags sorted out (``adapter_flags``)."""
    flags = adapter_flags(args)
    arch = tiny_arch(getattr(args, "tiny", None))
    if arch is None:
        return flags
    if flags.added and TINY_ARCHS[arch].family == "flux":
        raise ValueError(f"{flags.added[0].flag}: {ONE_ADAPTER_ON_FLUX}")
    for key, given in (("base_model", getattr(args, "base_model", None)), ("image_encoder", flags.image_encoder)):
        if given:
            raise ValueError(
                f"{MODEL_FLAGS[key]} cannot be used with --tiny (it picks the tiny base model and image encoder)"
            )
    if getattr(args, "preset_given", False):
        raise ValueError("--preset cannot be used with --tiny (it picks the tiny models)")
    return flags


# ----------------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class AddedAdapter:
    """An adapter added beside the default one by ``--adapter NAME=FILE`` (or recorded by a recipe).

    adapter: its file, local or ``owner/repo/file``; image_encoder: the folder or ``owner/repo/subfolder``
    of the image encoder it reads (None: a loaded one that gives its features; with ``--tiny`` the tiny
    encoder of its projection); preset: the preset that named it (``face=ip-sdxl-plus-face``: its file,
    encoder and default scale); sha256: the SHA-256 its file must have, recorded in ``recorded_in``."""

    name: str
    adapter: str
    image_encoder: str | None = None
    preset: str | None = None
    sha256: str | None = None
    recorded_in: str | None = None

    @property
    def flag(self) -> str:
        """How errors name it: the flag as typed, or the recipe that recorded it."""
        if self.recorded_in is not None:
            return f"the adapter {self.name!r} recorded in {self.recorded_in!r}"
        return f"--adapter {self.name}={self.preset or self.adapter}"


@dataclass(frozen=True)
class AdapterFlags:
    """``--adapter`` / ``--image-encoder`` sorted out: the default adapter's file and image encoder (None:
    the preset's) and the added adapters in the order given."""

    adapter: str | None = None
    image_encoder: str | None = None
    added: tuple[AddedAdapter, ...] = ()


def split_named(value: str) -> tuple[str | None, str]:
    """``NAME=VALUE`` → (NAME, VALUE) when NAME is an adapter name; a path or Hub id → (None, value)."""
    name, sep, rest = value.partition("=")
    if sep and ADAPTER_NAME.fullmatch(name.strip()):
        return name.strip(), rest.strip()
    return None, value.strip()


def _values(given) -> list[str]:
    """A flag's values: None, one string (a caller's Namespace) or the list ``action="append"`` makes."""
    if given is None:
        return []
    return [given] if isinstance(given, (str, Path)) else [str(value) for value in given]


def adapter_flags(args) -> AdapterFlags:
    """The adapter flags of ``args``: sorted out already (``args.adapters``, as ``generate`` merges them
    with a recipe's), else parsed from ``args.adapter`` / ``args.image_encoder``."""
    added = getattr(args, "adapters", None)
    if isinstance(added, tuple):
        return AdapterFlags(getattr(args, "adapter", None), getattr(args, "image_encoder", None), added)
    tiny = tiny_arch(getattr(args, "tiny", None)) is not None
    return parse_adapter_flags(getattr(args, "adapter", None), getattr(args, "image_encoder", None), tiny=tiny)


def _named_values(
    flag: str, values, takes: str, default_is: str, hint: str = ""
) -> tuple[str | None, dict[str, str]]:
    """A repeatable ``FLAG [NAME=]VALUE``'s values → (the default adapter's value or None, {name: value}
    in the order given); a bare value or ``default=`` is the default's. Each one is given once."""
    default: str | None = None
    named: dict[str, str] = {}
    for value in _values(values):
        name, source = split_named(value)
        if not source:
            raise ValueError(f"{flag} takes {takes} or NAME={takes}, got {value!r}")
        if name is None or name == DEFAULT_ADAPTER:
            if default is not None:
                raise ValueError(f"{flag} gives the {default_is} twice ({default!r} and {source!r}){hint}")
            default = source
        elif name in named:
            raise ValueError(f"{flag} {name}={source}: {flag} {name}={named[name]} names {name!r} already")
        else:
            named[name] = source
    return default, named


def parse_adapter_flags(
    adapters, encoders, *, tiny: bool = False, recorded: Sequence[AddedAdapter] = ()
) -> AdapterFlags:
    """``--adapter [NAME=]FILE`` and ``--image-encoder [NAME=]DIR`` values → ``AdapterFlags``, checked
    before anything loads: one default adapter and encoder, each name once, a NAME=FILE's local file
    there, an encoder only for a named adapter. recorded: a recipe's added adapters, kept unless a flag
    names them again (``--image-encoder NAME=DIR`` may replace a recorded one's encoder)."""
    default, named_files = _named_values(
        "--adapter", adapters, "FILE", "default adapter", ": add another one under a name, --adapter NAME=FILE"
    )
    added = {adapter.name: adapter for adapter in recorded}
    for name, source in named_files.items():
        added[name] = _added_adapter(name, source, tiny)
    encoder, named_encoders = _named_values("--image-encoder", encoders, "DIR", "default adapter's encoder")
    for name, source in named_encoders.items():
        flag = f"--image-encoder {name}={source}"
        if name not in added:
            others = ", ".join(added) or "none"
            raise ValueError(f"{flag}: no --adapter is named {name!r} (added adapters: {others})")
        _check_source(source, flag, folder=True, hub=not tiny)
        added[name] = dataclasses.replace(added[name], image_encoder=source)
    return AdapterFlags(default, encoder, tuple(added.values()))


def _added_adapter(name: str, source: str, tiny: bool) -> AddedAdapter:
    """``--adapter NAME=SOURCE``: a file (local, or ``owner/repo/file``), or a preset's adapter and encoder."""
    from mipadapter.config import PRESETS

    flag = f"--adapter {name}={source}"
    if source in PRESETS and not Path(source).expanduser().exists():
        if tiny:
            raise ValueError(f"{flag}: a preset names real models; with --tiny give a file made for the tiny models")
        if preset_family(source) == "flux":
            raise ValueError(f"{flag}: {ONE_ADAPTER_ON_FLUX}")
        preset = PRESETS[source]
        return AddedAdapter(name, preset.adapter, preset.image_encoder, preset=source)
    _check_source(source, flag, folder=False, hub=not tiny)
    return AddedAdapter(name, source)


def _check_source(source: str, flag: str, *, folder: bool, hub: bool) -> None:
    """A local file (folder) that must exist; a Hub id (``owner/repo/file``, ``owner/repo[/subfolder]``)
    is looked for when it loads."""
    from mipadapter.hub import looks_local

    path = Path(source).expanduser()
    kind = "folder" if folder else "file"
    if path.is_dir() if folder else path.is_file():
        return
    if path.exists():
        wanted = "give the image encoder's folder" if folder else "name the checkpoint file inside it"
        raise ValueError(f"{flag}: that is a {'file' if folder else 'folder'}; {wanted}")
    slashes = source.strip("/").count("/")
    if not hub or looks_local(source) or slashes < (1 if folder else 2):
        raise FileNotFoundError(f"{flag}: no such {kind}")


def preset_family(name: str) -> str:
    """``flux`` or ``unet``: the kind of base model a preset loads (its declared architecture, else its
    base model's name)."""
    from mipadapter.config import PRESETS

    preset = PRESETS[name]
    declared = getattr(preset, "architecture", None)  # config.Preset may name it; else its base model does
    return declared or ("flux" if "/flux" in preset.base_model.lower() else "unet")


def pick_device_dtype(device: str, dtype: str, tiny: bool | str | None = False):
    """The CLI's choice (the library never chooses): cuda, then mps, then cpu; half precision on GPUs."""
    import torch

    if device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps …)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    if dtype == "auto":
        dtype = "float16" if device.type in ("cuda", "mps") and not tiny else "float32"
    return device, getattr(torch, dtype)


# ----------------------------------------------------------------------------------------------- loading
def load_pipeline(args, device, dtype, check_adapters=None):
    """Build the pipeline the arguments describe; returns it and a ``ModelRecord`` of what was loaded.

    check_adapters: called with {adapter name: ``AdapterConfig``} (the default one and each added one)
    once the adapter files are read and before the base model loads (the tiny models: once built), so
    that what the call asks of them (``mixed_rule``) is refused before the slow part.

    args: ``tiny`` (None, True, or an architecture of ``TINY_ARCHS``), ``preset``, ``base_model``,
    ``adapter``, ``image_encoder`` (the flags' values, or as ``adapter_flags`` takes them), and from a
    recipe ``adapter_sha256`` / ``recorded_in`` (the default adapter file must be the recorded one).
    Small things are checked before big ones (see ``mipadapter.pipeline.loading``): every adapter file is
    hashed, read and checked against the base model's config before the base model loads. Errors name
    the flags.
    """
    flags = check_model_flags(args)
    arch = tiny_arch(getattr(args, "tiny", None))
    recorded_in = getattr(args, "recorded_in", None)
    expected = getattr(args, "adapter_sha256", None)
    if arch is not None:
        from mipadapter.pipeline.encoding import denoiser

        digest = None
        if flags.adapter is not None:
            digest = _adapter_file(flags.adapter, MODEL_FLAGS["adapter"], "the recorded adapter", expected, recorded_in)[1]
        files = [_added_file(added) for added in flags.added]
        pipe, record = load_tiny(arch, flags.adapter)
        added = _add_tiny_adapters(pipe, arch, flags.added, files)
        if check_adapters is not None:
            check_adapters({name: adapter.config for name, adapter in pipe.adapters.items()})
        record = dataclasses.replace(record, adapter_sha256=digest, adapters=added)
        pipe.to(device)
        if dtype != denoiser(pipe.pipe).dtype:
            pipe.to(dtype=dtype)
        return pipe, record
    from mipadapter.config import PRESETS
    from mipadapter.pipeline import MIPAdapterPipeline

    preset = PRESETS[args.preset]
    path, digest = _adapter_file(
        flags.adapter or preset.adapter, MODEL_FLAGS["adapter"], "the recorded adapter", expected, recorded_in
    )
    encoder = _recorded_path(flags.image_encoder or preset.image_encoder)
    base_model = args.base_model or preset.base_model
    prepared = _check_added_adapters(flags.added, base_model, encoder)
    if check_adapters is not None and prepared:  # one adapter: the library checks its call as always
        configs = {DEFAULT_ADAPTER: _default_adapter_config(path, base_model)}
        check_adapters(configs | {added.name: checked.config for added, _, _, checked, _ in prepared})
    pipe = MIPAdapterPipeline.from_pretrained(
        args.base_model,
        flags.adapter,
        encoder if flags.image_encoder else None,
        preset=args.preset,
        torch_dtype=dtype,
        argument_names=MODEL_FLAGS,
    )
    records = _add_adapters(pipe, prepared)
    record = ModelRecord(
        base_model=_recorded_path(args.base_model or preset.base_model),
        adapter=_recorded_path(flags.adapter or preset.adapter),
        image_encoder=encoder,
        preset=args.preset,
        adapter_sha256=digest,
        adapters=records,
    )
    return pipe.to(device), record


def _adapter_file(source: str, where: str, what: str, expected: str | None, recorded_in: str | None):
    """(path, SHA-256) of an adapter file (local or ``owner/repo/file``); a recorded SHA-256 (``expected``,
    from ``recorded_in``) it no longer has is refused in one line naming ``what`` and the file."""
    from mipadapter.hub import resolve_file
    from mipadapter.provenance import file_sha256
    from mipadapter.recipe import RecipeError

    path = resolve_file(source, "adapter", where)
    digest = file_sha256(path)
    if expected is not None and digest != expected:
        raise RecipeError(
            f"{what} {str(path.resolve())!r} has changed since {recorded_in!r} was made (its SHA-256 differs)"
        )
    return path, digest


def _added_file(added: AddedAdapter):
    """(path, SHA-256) of an added adapter's file, checked against its recorded SHA-256."""
    where = f"--adapter {added.name}"
    return _adapter_file(added.adapter, where, f"the recorded adapter {added.name!r}", added.sha256, added.recorded_in)


def _read_added(added: AddedAdapter, path: Path, model, base: str, default_scale: float | None = None):
    """An added adapter's file read and checked against ``model`` (the UNet, on ``meta`` or not), every
    refusal one line starting with the flag that gave it."""
    from mipadapter.checkpoint import read_file
    from mipadapter.pipeline.loading import check_adapter_fits

    try:
        return check_adapter_fits(read_file(path), model, path, base, default_scale)
    except (ValueError, OSError) as error:
        text = str(error).removeprefix(f"{path}: ")  # the flag names the file already
        raise ValueError(f"{added.flag}: {text}") from None


def _default_adapter_config(path: Path, base_model: str):
    """The default adapter file's ``AdapterConfig``, read as ``from_pretrained`` will read it (the file
    read once more there: only a call that adds adapters needs it before)."""
    from mipadapter.checkpoint import read_file
    from mipadapter.pipeline.loading import check_adapter_fits, denoiser_skeleton

    skeleton = denoiser_skeleton(base_model, "base model", MODEL_FLAGS["base_model"])
    try:
        return check_adapter_fits(read_file(path), skeleton, path, f"the base model {base_model!r}").config
    except (ValueError, OSError) as error:
        raise ValueError(f"{MODEL_FLAGS['adapter']}: {str(error).removeprefix(f'{path}: ')}") from None


def _check_added_adapters(added: Sequence[AddedAdapter], base_model: str, default_encoder: str):
    """Each added adapter's file hashed, read and checked against the base model's UNet config, and the
    image encoder it will read chosen and checked from its config, before any model loads. Returns
    ``[(added, path, sha256, checked file, encoder source)]``."""
    if not added:
        return []
    from diffusers import UNet2DConditionModel

    from mipadapter.config import PRESETS
    from mipadapter.pipeline.loading import check_image_encoder, denoiser_skeleton, image_encoder_gives

    skeleton = denoiser_skeleton(base_model, "base model", MODEL_FLAGS["base_model"])
    if not isinstance(skeleton, UNet2DConditionModel):
        raise ValueError(f"{added[0].flag}: {ONE_ADAPTER_ON_FLUX}")
    encoders = [default_encoder]  # where a loaded encoder came from, the default adapter's first
    prepared = []
    for one in added:
        path, digest = _added_file(one)
        scale = PRESETS[one.preset].scale if one.preset else None
        checked = _read_added(one, path, skeleton, f"the base model {base_model!r}", scale)
        if one.image_encoder is not None:
            encoder = _recorded_path(one.image_encoder)
            check_image_encoder(encoder, checked.config, f"--image-encoder {one.name}")
        else:
            fitting = [e for e in encoders if image_encoder_gives(e, checked.config, MODEL_FLAGS["image_encoder"])]
            if not fitting:
                kind = "hidden states" if checked.config.uses_hidden_states else "embeddings"
                raise ValueError(
                    f"{one.flag}: it takes {checked.config.image_embed_dim}-wide image {kind}, which no other "
                    f"adapter's image encoder gives: give --image-encoder {one.name}=DIR"
                )
            encoder = fitting[0]
        encoders.append(encoder)
        prepared.append((one, path, digest, checked, encoder))
    return prepared


def _built(pipe, checked, path: Path):
    """A checked added adapter file built on ``pipe``'s loaded UNet, on its default adapter's device and
    dtype."""
    from mipadapter.checkpoint import adapter_from_file
    from mipadapter.pipeline.encoding import denoiser

    reference = next(pipe.adapter.parameters())
    adapter = adapter_from_file(checked, denoiser(pipe.pipe), str(path))
    return adapter.to(device=reference.device, dtype=reference.dtype)


def _add_adapters(pipe, prepared) -> tuple[AdapterRecord, ...]:
    """The checked added adapters built on the loaded UNet and added to ``pipe`` (an encoder from the same
    place as one loaded already is that one); their records."""
    records = []
    for added, path, digest, checked, encoder in prepared:
        pipe.add_adapter(added.name, _built(pipe, checked, path), encoder)
        records.append(AdapterRecord(added.name, _recorded_path(added.adapter), digest, encoder, added.preset))
    return tuple(records)


def _add_tiny_adapters(pipe, arch: str, added: Sequence[AddedAdapter], files) -> tuple[AdapterRecord, ...]:
    """The added adapters (files made for the tiny models) onto the tiny pipeline, all checked before any
    is built; each reads its ``--image-encoder NAME=DIR`` or the tiny image encoder of its projection (one
    per projection, the default adapter's when it is the same). files: ``_added_file`` of each."""
    if not added:
        return ()
    from mipadapter.pipeline.encoding import denoiser
    from mipadapter.pipeline.loading import check_image_encoder
    from mipadapter.testing.mip import ARCHS, tiny_parts

    model = denoiser(pipe.pipe)
    checked = [_read_added(one, path, model, f"--tiny {arch}") for one, (path, _) in zip(added, files, strict=True)]
    for one, file in zip(added, checked, strict=True):
        if one.image_encoder is not None:
            check_image_encoder(_recorded_path(one.image_encoder), file.config, f"--image-encoder {one.name}")
    spec = ARCHS[arch][0]

    def encoder_spec(projection: str):  # SD1.5's basic and Plus adapters read the same ViT-H: one copy
        return spec.basic_image_encoder if projection == "basic" else spec.plus_image_encoder

    built = {encoder_spec(pipe.adapter.config.projection): (pipe.image_encoder, pipe.feature_extractor)}
    records = []
    for one, (path, digest), file in zip(added, files, checked, strict=True):
        adapter = _built(pipe, file, path)
        if one.image_encoder is not None:
            encoder = _recorded_path(one.image_encoder)
            pipe.add_adapter(one.name, adapter, encoder)
        else:
            projection = file.config.projection
            if encoder_spec(projection) not in built:
                built[encoder_spec(projection)] = tiny_parts(arch, projection, base_pipe=pipe.pipe)[1:]
            pipe.add_adapter(one.name, adapter, *built[encoder_spec(projection)])
            encoder = tiny_encoder_label(arch, projection)
        records.append(AdapterRecord(one.name, str(path.resolve()), digest, encoder))
    return tuple(records)


def tiny_encoder_label(arch: str, projection: str) -> str:
    """How a recipe records a tiny built-in image encoder (``is_tiny_encoder`` reads it back)."""
    return f"tiny {arch} {projection} (random)"


def is_tiny_encoder(recorded: str) -> bool:
    return recorded.startswith("tiny ") and recorded.endswith(" (random)")


def _recorded_path(source) -> str:
    """A local file or folder as an absolute path (so a recipe works from any folder); a Hub id as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else str(source)


def load_tiny(arch: str, adapter: str | Path | None = None):
    """The tiny pipeline of ``arch``; with ``adapter`` (a file trained or saved on the tiny models; for
    ``flux`` also an XLabs-layout file sized for the tiny FLUX) that adapter on the tiny base model and the
    tiny image encoder its projection needs."""
    from mipadapter.testing.mip import tiny_mip_pipeline

    if arch not in TINY_ARCHS:
        raise ValueError(f"--tiny {arch!r}: choose one of {', '.join(TINY_ARCHS)}")
    base = f"tiny-{arch} (random)"
    if adapter is None:
        pipe = tiny_mip_pipeline(arch, "basic", text_weight=True)
        _as_default_preset(pipe)
        return pipe, ModelRecord(base, TINY_ADAPTER, f"tiny {arch} basic (random)", None, arch)
    from mipadapter.hub import resolve_file
    from mipadapter.testing.mip import tiny_pipeline_with_adapter

    path = resolve_file(adapter, "adapter", "--adapter")
    tiny, projection = tiny_pipeline_with_adapter(arch, path, f"--tiny {arch}")
    record = ModelRecord(base, str(path.resolve()), tiny_encoder_label(arch, projection), None, arch)
    _as_default_preset(tiny)
    return tiny, record


def _as_default_preset(pipe) -> None:
    """A tiny MIP adapter (one with a text weight) on a UNet stands for the default preset, ``mip-sdxl``:
    it takes that preset's default negative prompt (the authors'), as a real run would."""
    from mipadapter.config import DEFAULT_PRESET, PRESETS

    if pipe.adapter.config.text_weight and pipe.architecture == "unet":
        pipe.default_negative_prompt = PRESETS[DEFAULT_PRESET].negative_prompt


# ----------------------------------------------------------------------------------------------- photos
def open_photos(subjects: Sequence[SubjectArg], max_pixels: int | None):
    """Every subject's photos decoded, upright (EXIF), each refused by its header above ``max_pixels``."""
    from mipadapter.photos import open_photo

    labels = subject_labels([s.name for s in subjects])

    def what(subject: SubjectArg, label: str, number: int) -> str:
        return f"recorded photo {number} of {label!r}" if subject.recorded else f"--subject {label}"

    return [
        [
            open_photo(photo, what(subject, label, number), max_pixels=max_pixels)
            for number, photo in enumerate(subject.photos, start=1)
        ]
        for subject, label in zip(subjects, labels, strict=True)
    ]


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out_1.png``, ``out_2.png``… for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{index + 1}{output.suffix}") for index in range(count)]
