"""The real loading code (`from_pretrained` with local folders and with Hub ids) on tiny saved models.

Hub ids are resolved through a Hub cache laid out as huggingface_hub writes it, with the Hub offline,
so the same code that downloads on a user's machine runs here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mipadapter import MIPAdapterPipeline, Subject
from mipadapter.checkpoint import CheckpointError
from mipadapter.hub import ModelNotFoundError
from mipadapter.testing import tiny_checkpoint_files, tiny_sd15_pipeline, tiny_sdxl_pipeline

ASSETS = Path(__file__).resolve().parents[1] / "assets"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny SDXL pipeline saved like a diffusers repo, and h94/MIP-style files beside it."""
    root = tmp_path_factory.mktemp("models")
    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(root / "base")
    files = tiny_checkpoint_files(root / "adapters", pipe) if (root / "adapters").mkdir() is None else None
    return root, files


def _generate(pipe: MIPAdapterPipeline) -> np.ndarray:
    from PIL import Image

    cat = Image.open(ASSETS / "cat.jpg")
    out = pipe(
        "a cat on a sofa",
        [Subject("cat", [cat])],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    return out.images


def test_from_pretrained_with_local_paths(saved):
    root, files = saved
    pipe = MIPAdapterPipeline.from_pretrained(root / "base", files.mip_basic_bin, files.basic_image_encoder)
    assert pipe.adapter.config.text_weight and pipe.adapter.config.default_rule.value == "official"
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay out ``files`` (path in repo → local source) as huggingface_hub's cache of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for inside, source in files.items():
        target = repo / "snapshots" / COMMIT / inside
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy(source, target)


def test_from_pretrained_with_hub_ids_from_the_cache(saved, tmp_path, monkeypatch):
    root, files = saved
    cache = tmp_path / "hub"
    base = root / "base"
    _fake_hub_cache(
        cache,
        "someone/tiny-sdxl",
        {p.relative_to(base).as_posix(): p for p in base.rglob("*") if p.is_file()},
    )
    _fake_hub_cache(cache, "someone/tiny-mip", {"model_sdxl.bin": files.mip_basic_bin})
    _fake_hub_cache(cache, "someone/tiny-ip", {"sdxl_models/image_encoder": files.basic_image_encoder})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    pipe = MIPAdapterPipeline.from_pretrained(
        "someone/tiny-sdxl",
        "someone/tiny-mip/model_sdxl.bin",
        "someone/tiny-ip/sdxl_models/image_encoder",
        cache_dir=str(cache),
    )
    local = MIPAdapterPipeline.from_pretrained(base, files.mip_basic_bin, files.basic_image_encoder)
    np.testing.assert_array_equal(_generate(pipe), _generate(local))


@pytest.mark.parametrize("which", ["base", "adapter", "encoder"])
def test_missing_models_name_themselves_and_their_flag(saved, tmp_path, monkeypatch, which):
    root, files = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    sources = {"base": root / "base", "adapter": files.mip_basic_bin, "encoder": files.basic_image_encoder}
    missing = {
        "base": "nobody/no-base",
        "adapter": "nobody/no-adapter/model.bin",
        "encoder": "nobody/no-ip/image_encoder",
    }
    arguments = {"base": "point base_model", "adapter": "point adapter", "encoder": "point image_encoder"}
    sources[which] = missing[which]
    with pytest.raises(ModelNotFoundError) as error:
        MIPAdapterPipeline.from_pretrained(sources["base"], sources["adapter"], sources["encoder"])
    assert missing[which] in str(error.value) and arguments[which] in str(error.value)
    assert "not in the local cache and HF_HUB_OFFLINE is set" in str(error.value)


def test_preset_scale_applies_to_files_without_a_config_and_ours_keep_their_own(saved, tmp_path):
    from mipadapter import save_adapter

    root, files = saved
    authors = MIPAdapterPipeline.from_pretrained(
        root / "base", files.mip_basic_bin, files.basic_image_encoder, preset="mip-sdxl-plus"
    )
    assert authors.adapter.config.default_scale == 0.65
    ours = tmp_path / "ours.safetensors"
    save_adapter(authors.adapter, ours)
    again = MIPAdapterPipeline.from_pretrained(
        root / "base", ours, files.basic_image_encoder, preset="mip-sdxl"
    )
    assert again.adapter.config.default_scale == 0.65


@pytest.fixture
def no_big_loads(monkeypatch):
    """Loading the base model or the image encoder's weights fails the test: checks must come first."""
    from diffusers import DiffusionPipeline
    from transformers import CLIPVisionModelWithProjection

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the small checks ran")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", refuse)


@pytest.mark.usefixtures("no_big_loads")
def test_a_bad_adapter_is_refused_before_any_model_loads(saved, tmp_path):
    root, files = saved
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors is not a readable safetensors file"):
        MIPAdapterPipeline.from_pretrained(root / "base", bad, files.basic_image_encoder)
    sd15_files = tiny_checkpoint_files(tmp_path / "sd15", tiny_sd15_pipeline())
    with pytest.raises(ValueError, match="another base model"):  # the SD1.5 adapter vs SDXL's unet config
        MIPAdapterPipeline.from_pretrained(root / "base", sd15_files.mip_basic_bin, files.basic_image_encoder)


@pytest.mark.usefixtures("no_big_loads")
def test_an_image_encoder_that_does_not_fit_the_adapter_is_refused_by_its_config(saved):
    root, files = saved
    with pytest.raises(ValueError, match=r"image_encoder '.*' has hidden size \d+, but the plus adapter"):
        MIPAdapterPipeline.from_pretrained(root / "base", files.mip_plus_bin, files.basic_image_encoder)
    with pytest.raises(ValueError, match=r"--image-encoder '.*' has projection size \d+, but the basic"):
        MIPAdapterPipeline.from_pretrained(
            root / "base",
            files.mip_basic_bin,
            files.plus_image_encoder,
            argument_names={"image_encoder": "--image-encoder"},
        )


def test_a_base_model_folder_without_a_unet_config_is_named(saved, tmp_path):
    _, files = saved
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"base model '.*empty' has no unet/config\.json"):
        MIPAdapterPipeline.from_pretrained(tmp_path / "empty", files.mip_basic_bin, files.basic_image_encoder)
