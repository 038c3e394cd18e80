"""The table of checkpoint layouts: the package has no import cycle, the generic code names no layout, and a
layout registered from outside (here, a toy one in this test) is read, checked, loaded, written and converted
by the generic code without editing it."""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch

import mipadapter.checkpoint as checkpoint_package
from mipadapter.checkpoint import (
    CheckpointError,
    check_adapter_file,
    convert_checkpoint,
    layouts,
    load_adapter,
    read_file,
    save_adapter,
)
from mipadapter.checkpoint.keymaps import KeyRule
from mipadapter.config import AdapterConfig
from mipadapter.modeling import MIPAdapter

PACKAGE = "mipadapter.checkpoint"
PACKAGE_DIR = Path(checkpoint_package.__file__).parent
GENERIC = ("convert", "io", "keymaps", "layouts")  # the modules that must never name a layout


def package_imports(module: str) -> set[str]:
    """The package modules ``module`` imports, at any level (function bodies included); ``__init__`` stands
    for the package itself (which imports every layout module)."""
    tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8"))
    submodules = {path.stem for path in PACKAGE_DIR.glob("*.py")}

    def target(dotted: str) -> str | None:
        if dotted == PACKAGE:
            return "__init__"
        if dotted.startswith(PACKAGE + "."):
            return dotted.removeprefix(PACKAGE + ".").split(".")[0]
        return None

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {target(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == PACKAGE:
            found |= {alias.name if alias.name in submodules else "__init__" for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(target(node.module))
    return found - {None, module}


def import_graph() -> dict[str, set[str]]:
    modules = sorted(path.stem for path in PACKAGE_DIR.glob("*.py"))
    return {module: package_imports(module) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, [*path, target])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_the_checkpoint_package_has_no_import_cycle():
    graph = import_graph()
    assert {"convert", "io", "keymaps", "layouts", "ours", "h94", "xlabs"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"
    # no module reaches back into the package __init__ (which imports every layout module)
    assert [module for module, targets in graph.items() if "__init__" in targets] == []


def test_the_cycle_finder_sees_a_lazy_import():
    """The guard itself: convert.py importing xlabs inside a function (as it once did) closes a circle."""
    graph = import_graph()
    graph["convert"] = graph["convert"] | {"xlabs"}
    assert find_cycle(graph) in (["convert", "xlabs", "convert"], ["xlabs", "convert", "xlabs"])


def test_generic_modules_import_no_layout_module_and_name_no_layout():
    layout_modules = {"ours", "h94", "xlabs"}
    names = {"h94", "xlabs", "authors", "diffusers", "flux", "unet"}
    for module in GENERIC:
        assert not package_imports(module) & layout_modules, module
        tree = ast.parse((PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        literals = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        }
        assert not literals & names, (module, literals & names)


# --- a toy layout registered from this test -------------------------------------------------------------

TOY = "toy"


def toy_config(unet) -> AdapterConfig:
    return AdapterConfig("basic", 24, unet.config.cross_attention_dim, 3, text_weight=True, default_scale=0.4)


def _toy_rules(adapter) -> list[KeyRule]:
    """Every module key under ``toy.``, reversed (a table no built-in layout has)."""
    return [KeyRule(_toy_key(key), (key,)) for key in adapter.state_dict()]


def _toy_key(module_key: str) -> str:
    return f"toy.{module_key[::-1]}"


def _toy_config(state, source):
    """The sizes off the shapes, as the built-in tables do; the scale is the toy format's own."""
    norm, proj = state.get(_toy_key("image_proj.norm.weight")), state.get(_toy_key("image_proj.image_embeds.weight"))
    if norm is None or proj is None:
        raise CheckpointError(f"{source}: not a toy file")
    text_weight = any(key.startswith(_toy_key("text_to_weight.weight")) for key in state)
    return AdapterConfig(
        "basic", proj.shape[1], norm.shape[0], proj.shape[0] // norm.shape[0], text_weight=text_weight,
        default_scale=0.4,
    )


def _claims_toy(metadata, keys) -> bool:
    return bool(keys) and all(key.startswith("toy.") for key in keys)


def _toy_check(config, path):
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"toy files are safetensors, not {path.name!r}")


@pytest.fixture
def toy_layout():
    before = (layouts.save_format_names(), dict(layouts._LAYOUTS), dict(layouts._KEY_TABLES))
    layouts.register(
        layouts.Layout(
            TOY,
            description="a toy checkpoint",
            home="toy-friendly",
            recognise=_claims_toy,
        ),
        layouts.KeyTable(TOY, "unet", _toy_rules, _toy_config),
        layouts.SaveFormat(TOY, TOY, _toy_check),
    )
    try:
        yield
    finally:
        layouts.unregister(TOY)
    assert (layouts.save_format_names(), layouts._LAYOUTS, layouts._KEY_TABLES) == before


def _random_adapter(unet, seed: int, dtype: torch.dtype) -> MIPAdapter:
    adapter = MIPAdapter.for_unet(unet, toy_config(unet))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return adapter.to(dtype)


@pytest.mark.parametrize(("arch", "dtype"), [("sd15", torch.float16), ("sdxl", torch.bfloat16)])
def test_a_registered_layout_is_read_loaded_written_and_converted(toy_layout, shared_unet, tmp_path, arch, dtype):
    unet = shared_unet(arch)
    adapter = _random_adapter(unet, seed=5, dtype=dtype)
    assert TOY in layouts.save_format_names()

    path = save_adapter(adapter, tmp_path / "a.safetensors", format=TOY)
    read = read_file(path)
    assert read.layout == TOY and read.config is None
    assert all(key.startswith("toy.") for key in read.state) and len(read.state) == len(adapter.state_dict())
    assert check_adapter_file(path, unet).config == toy_config(unet)  # read off the file by the toy table
    loaded = load_adapter(path, unet)
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.float()), key  # a loaded adapter is float32

    # toy → ours → authors → toy, bit for bit
    ours = convert_checkpoint(path, tmp_path / "ours.safetensors", unet)
    assert read_file(ours).layout == "mipadapter" and read_file(ours).config == toy_config(unet)
    authors = convert_checkpoint(ours, tmp_path / "authors.bin", unet, "authors")
    back = convert_checkpoint(authors, tmp_path / "back.safetensors", unet, TOY, default_scale=0.4)
    again = read_file(back)
    assert again.layout == TOY and set(again.state) == set(read.state)
    for key, value in read.state.items():
        assert again.state[key].dtype == dtype and torch.equal(again.state[key], value), key

    with pytest.raises(ValueError, match=r"^toy files are safetensors, not 'a\.bin'$"):
        save_adapter(adapter, tmp_path / "a.bin", format=TOY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "authors.bin", "back.safetensors",
                                                           "ours.safetensors"]


def test_a_registered_layout_refuses_a_model_it_has_no_table_for(toy_layout, shared_unet, tmp_path):
    from mipadapter.pipeline.loading import check_adapter_fits
    from mipadapter.testing.flux import tiny_flux_pipeline

    path = save_adapter(_random_adapter(shared_unet("sd15"), 1, torch.float32), tmp_path / "a.safetensors", TOY)
    transformer = tiny_flux_pipeline().transformer
    with pytest.raises(CheckpointError) as refused:
        check_adapter_fits(read_file(path), transformer, path, "base_model 'flux'")
    assert str(refused.value) == (
        f"{path} is a toy checkpoint, but base_model 'flux' is a FluxTransformer2DModel: load it onto a "
        "toy-friendly base model"
    )
    with pytest.raises(CheckpointError, match=r"is a toy checkpoint file, which does not fit FluxTransformer2DModel"):
        check_adapter_file(path, transformer)


def test_an_unregistered_layout_is_gone(shared_unet, tmp_path):
    """Once the toy layout is unregistered its file is no longer claimed: read as h94 and refused key by key."""
    unet = shared_unet("sd15")
    layouts.register(
        layouts.Layout(TOY, description="a toy checkpoint", recognise=_claims_toy),
        layouts.KeyTable(TOY, "unet", _toy_rules, _toy_config),
        layouts.SaveFormat(TOY, TOY, _toy_check),
    )
    try:
        path = save_adapter(_random_adapter(unet, 2, torch.float32), tmp_path / "a.safetensors", TOY)
    finally:
        layouts.unregister(TOY)
    assert read_file(path).layout == "h94"
    with pytest.raises(CheckpointError, match="unrecognised image_proj layout"):
        check_adapter_file(path, unet)
    with pytest.raises(ValueError, match="unknown checkpoint format 'toy'"):
        save_adapter(_random_adapter(unet, 2, torch.float32), tmp_path / "b.safetensors", TOY)


def test_the_table_refuses_a_second_registration_and_a_second_fallback():
    with pytest.raises(ValueError, match="'xlabs' is registered already"):
        layouts.register(layouts.Layout("xlabs", description="again", recognise=lambda metadata, keys: False))
    with pytest.raises(ValueError, match="'h94' already reads the unclaimed files"):
        layouts.register(layouts.Layout("other", description="a second fallback"))
    assert "other" not in layouts._LAYOUTS


def test_a_file_two_layouts_claim_is_refused(toy_layout, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "both.safetensors"
    save_file({"toy.x": torch.zeros(1)}, str(path), metadata={"format": "mipadapter", "format_version": "1"})
    with pytest.raises(CheckpointError, match=r"fits several checkpoint layouts \((mipadapter, toy|toy, mipadapter)\)"):
        read_file(path)


def test_the_convert_command_offers_every_registered_format():
    """``mipadapter convert --to`` keeps its own list (its parser imports no torch): it must name the table's."""
    from mipadapter.checkpoint import SAVE_FORMATS
    from mipadapter.cli.convert import FORMAT_SUFFIXES

    assert sorted(FORMAT_SUFFIXES) == list(SAVE_FORMATS) == list(layouts.save_format_names())


def test_a_layout_without_config_inference_refuses_a_file_without_a_config(shared_unet, tmp_path):
    unet = shared_unet("sd15")
    layouts.register(
        layouts.Layout(TOY, description="a toy checkpoint", recognise=_claims_toy),
        layouts.KeyTable(TOY, "unet", _toy_rules),  # no infer_config: its files would carry their own
        layouts.SaveFormat(TOY, TOY, _toy_check),
    )
    try:
        path = save_adapter(_random_adapter(unet, 3, torch.float32), tmp_path / "a.safetensors", TOY)
        with pytest.raises(CheckpointError) as refused:
            check_adapter_file(path, unet)
    finally:
        layouts.unregister(TOY)
    assert str(refused.value) == f"{path}: a toy file carries its adapter config, and this one has none"


@contextlib.contextmanager
def _toy_registered(rules=_toy_rules, *, home=None):
    """The toy layout registered for one test (its rules and home as given), then removed."""
    layouts.register(
        layouts.Layout(TOY, description="a toy checkpoint", home=home, recognise=_claims_toy),
        layouts.KeyTable(TOY, "unet", rules, _toy_config),
        layouts.SaveFormat(TOY, TOY, _toy_check),
    )
    try:
        yield
    finally:
        layouts.unregister(TOY)


def test_a_layout_without_a_home_says_a_different_pipeline(shared_unet, tmp_path):
    from mipadapter.testing.flux import tiny_flux_pipeline

    with _toy_registered():
        path = save_adapter(_random_adapter(shared_unet("sd15"), 1, torch.float32), tmp_path / "a.safetensors", TOY)
        transformer = tiny_flux_pipeline().transformer
        with pytest.raises(CheckpointError) as refused:
            check_adapter_file(path, transformer)
    assert str(refused.value) == (
        f"{path} is a toy checkpoint file, which does not fit FluxTransformer2DModel: load it onto a different "
        "pipeline"
    )


def test_a_key_table_that_leaves_a_parameter_out_cannot_load_it_silently(shared_unet, tmp_path):
    """A layout's rules missing one of the adapter's parameters (a programming error in a new layout) make
    loading fail, not leave that parameter as it was initialised."""
    unet = shared_unet("sd15")

    def partial_rules(adapter) -> list[KeyRule]:
        return [rule for rule in _toy_rules(adapter) if rule.modules[0] != "image_proj.norm.bias"]

    with _toy_registered(partial_rules):
        path = save_adapter(_random_adapter(unet, 1, torch.float32), tmp_path / "a.safetensors", TOY)
        assert _toy_key("image_proj.norm.bias") not in read_file(path).state
        with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"image_proj\.norm\.bias\""):
            load_adapter(path, unet)


def test_an_unknown_layout_name_lists_the_registered_ones():
    with pytest.raises(ValueError) as error:
        layouts.layout_named("onnx")
    assert str(error.value) == f"unknown checkpoint layout 'onnx'; the layouts are {sorted(layouts._LAYOUTS)}"
    assert "xlabs" in str(error.value) and "h94" in str(error.value)


@pytest.mark.parametrize("home", ["toy-friendly", None])
def test_writing_a_model_a_layout_has_no_table_for_says_where_its_files_go(home, shared_unet, tmp_path):
    from mipadapter.testing.flux import tiny_flux_pipeline

    with _toy_registered(home=home):
        transformer = tiny_flux_pipeline().transformer
        config = AdapterConfig("basic", 20, transformer.config.joint_attention_dim, 4, architecture="flux")
        with pytest.raises(CheckpointError) as error:
            save_adapter(MIPAdapter.for_model(transformer, config), tmp_path / "flux.safetensors", TOY)
    assert str(error.value) == (
        f"a toy checkpoint file does not fit a flux adapter: load it onto a {home or 'different'} pipeline"
    )
    assert list(tmp_path.iterdir()) == []
