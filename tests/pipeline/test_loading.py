"""The real loading code (`from_pretrained` with local folders and with Hub ids) on tiny saved models.

Hub ids are resolved through a Hub cache laid out as huggingface_hub writes it, with the Hub offline,
so the same code that downloads on a user's machine runs here.
"""

from __future__ import annotations

import json
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


# ----------------------------------------------------------------------------------------------- FLUX
DOG = ASSETS / "dreambooth" / "dog" / "00.jpg"


@pytest.fixture(scope="module")
def flux_saved(tmp_path_factory):
    """The tiny FLUX saved like a diffusers repo, an XLabs-layout file and its image encoder beside it."""
    from mipadapter.testing.flux import tiny_flux_ip_files, tiny_flux_pipeline

    root = tmp_path_factory.mktemp("flux")
    tiny_flux_pipeline().save_pretrained(root / "base")
    return root, tiny_flux_ip_files(root / "xlabs", seed=3, std=0.3)


def _flux_images(pipe: MIPAdapterPipeline) -> np.ndarray:
    from PIL import Image

    out = pipe(
        "a dog playing with a duck toy",
        [Subject("dog", [Image.open(DOG)]), Subject("duck toy", [Image.open(ASSETS / "backpack.jpg")])],
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        show_progress=False,
    )
    return out.images


def test_flux_from_pretrained_with_local_folders_is_the_same_models_in_memory(flux_saved):
    from transformers import CLIPVisionModelWithProjection

    from mipadapter.checkpoint import load_adapter
    from mipadapter.testing.flux import tiny_flux_pipeline

    root, files = flux_saved
    loaded = MIPAdapterPipeline.from_pretrained(root / "base", files.weight_path, files.image_encoder, preset="ip-flux")
    assert loaded.architecture == "flux" and type(loaded.pipe).__name__ == "FluxPipeline"
    assert loaded.adapter.config.default_scale == 1.0 and loaded.default_negative_prompt is None  # ip-flux's
    base = tiny_flux_pipeline()
    adapter = load_adapter(files.weight_path, base.transformer, default_scale=1.0)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(files.image_encoder))
    in_memory = MIPAdapterPipeline(base, adapter, encoder)
    images = _flux_images(loaded)
    np.testing.assert_allclose(images, _flux_images(in_memory), atol=1e-5, rtol=0)
    plain = tiny_flux_pipeline()
    plain.set_progress_bar_config(disable=True)
    text_only = plain("a dog playing with a duck toy", num_inference_steps=2, height=64, width=64,
                      output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert np.abs(images - text_only).max() > 1e-3  # the loaded adapter acts


def test_a_flux_base_model_without_a_preset_takes_ip_flux_defaults(flux_saved):
    root, files = flux_saved
    loaded = MIPAdapterPipeline.from_pretrained(root / "base", files.weight_path, files.image_encoder)
    assert loaded.architecture == "flux"
    assert loaded.adapter.config.default_scale == 1.0 and loaded.default_negative_prompt is None  # not mip-sdxl's


def _full_clip_folder(encoder_folder: Path, target: Path) -> Path:
    """A whole CLIP model (text and vision, ``vision_config`` nested, as openai/clip-vit-large-patch14 is
    published) whose vision half is the given image encoder."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(str(encoder_folder))
    sizes = vision.config.to_dict()
    vision_config = {key: value for key, value in sizes.items() if key not in ("architectures", "_name_or_path")}
    text_config = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1)  # fmt: skip
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=sizes["projection_dim"])
    model = CLIPModel(config)
    model.vision_model.load_state_dict(vision.vision_model.state_dict())
    model.visual_projection.load_state_dict(vision.visual_projection.state_dict())
    model.save_pretrained(target)
    return target


def test_flux_image_encoder_may_be_a_whole_clip_repository(flux_saved, tmp_path):
    from mipadapter.pipeline.loading import encoder_input_width

    root, files = flux_saved
    clip = _full_clip_folder(files.image_encoder, tmp_path / "clip-vit-large-patch14")
    config = json.loads((clip / "config.json").read_text())
    assert "vision_config" in config and encoder_input_width(config, uses_hidden_states=False) == 20
    assert encoder_input_width(config, uses_hidden_states=True) == config["vision_config"]["hidden_size"]
    whole = MIPAdapterPipeline.from_pretrained(root / "base", files.weight_path, clip, preset="ip-flux")
    alone = MIPAdapterPipeline.from_pretrained(root / "base", files.weight_path, files.image_encoder, preset="ip-flux")
    assert type(whole.image_encoder).__name__ == "CLIPVisionModelWithProjection"  # the vision half only
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(  # the same weights (float noise of another load path aside)
        whole.image_encoder(pixels).image_embeds, alone.image_encoder(pixels).image_embeds, atol=1e-6, rtol=0
    )
    images = _flux_images(whole)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.usefixtures("no_big_loads")
def test_flux_mismatches_are_one_line_naming_the_file_before_any_model_loads(flux_saved, saved, tmp_path):
    from mipadapter.checkpoint.xlabs import XLabsConfig
    from mipadapter.testing.flux import fabricate_xlabs_state, save_xlabs_file

    root, files = flux_saved
    sdxl_root, sdxl_files = saved
    wide = XLabsConfig(num_blocks=3, hidden_size=32, cross_attention_dim=64, image_embed_dim=20, num_tokens=4)
    other = save_xlabs_file(fabricate_xlabs_state(wide), tmp_path / "other_flux.safetensors")
    cases = [
        ((root / "base", other, files.image_encoder), rf"{other}: adapter tokens are 64 wide .* take \[48\]: this adapter belongs to another base model"),
        ((root / "base", sdxl_files.mip_basic_bin, files.image_encoder), str(sdxl_files.mip_basic_bin)),
        ((sdxl_root / "base", files.weight_path, files.image_encoder),
         rf"{files.weight_path} is an XLabs FLUX IP-Adapter, but base_model '.*base' is a UNet2DConditionModel"),
        ((root / "base", files.weight_path, sdxl_files.plus_image_encoder),
         r"image_encoder '.*' has projection size \d+, but the basic adapter takes 20-wide features"),
    ]  # fmt: skip
    for (base, adapter, encoder), message in cases:
        with pytest.raises(ValueError, match=message) as error:
            MIPAdapterPipeline.from_pretrained(base, adapter, encoder, preset="ip-flux")
        assert "\n" not in str(error.value)


def test_denoiser_kind_reads_model_index_json(tmp_path, flux_saved, saved):
    from mipadapter.pipeline.loading import denoiser_kind, denoiser_skeleton

    assert denoiser_kind(flux_saved[0] / "base") == "flux" and denoiser_kind(saved[0] / "base") == "unet"
    skeleton = denoiser_skeleton(flux_saved[0] / "base")
    assert type(skeleton).__name__ == "FluxTransformer2DModel" and next(skeleton.parameters()).is_meta
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}'
    )
    with pytest.raises(ValueError, match="is a StableDiffusion3Pipeline without a UNet or a FLUX transformer"):
        denoiser_kind(tmp_path / "sd3")
