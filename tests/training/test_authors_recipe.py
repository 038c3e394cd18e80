"""Training follows the authors' recipe by default (train_sdxl.py, train_sdxl_plus.py, subject_dataset.py):
the shipped configs, their box check and post-crop filter, the crop offset frame, a dropped Plus image,
the frozen UNet's precision, and the single-object multi-view option."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import write_authors_layout

from mipadapter.manifest import ImageRecord, ObjectRecord
from mipadapter.object_filters import ObjectFilterConfig
from mipadapter.training import config_from_dict, load_config
from mipadapter.training.samples import SampleSettings, build_sample, reference_views, segment_square
from mipadapter.training.sources import (
    DUPLICATE_NAMES,
    DataError,
    SubjectRules,
    authors_box_check,
    choose_subjects,
    final_subjects,
)

ROOT = Path(__file__).resolve().parents[2]

# The authors' values, read from their launch commands (README) and scripts.
AUTHORS_SDXL = {
    "model.base_model": "stabilityai/stable-diffusion-xl-base-1.0",
    "model.image_encoder": "h94/IP-Adapter/sdxl_models/image_encoder",
    "model.adapter_init": "h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin",
    "model.train_image_proj": False,  # only adapter_modules are in their optimizer
    "model.text_weight": True,
    "data.resolution": 512,
    "data.min_subjects": 2,
    "data.max_subjects": 2,  # max_num_objects = 2; a sample with fewer is skipped
    "data.flip_prob": 0.5,  # RandomHorizontalFlip(p=0.5)
    "data.crop": "authors",
    "data.crop_coords": "authors",
    "data.filters.min_area_frac": 0.08,
    "data.filters.max_area_frac": 0.7,
    "data.filters.min_aspect_ratio": 0.3,
    "data.filters.max_aspect_ratio": 3.0,
    "data.filters.min_score": 0.3,
    "data.filters.nested_overlap": 0.8,
    "data.filters.caption_match": "substring",
    "data.filters.duplicate_names": "drop_sample",
    "data.filters.authors_box_check": True,
    "data.filters.post_crop_filter": True,
    "optim.rule": "official",
    "optim.learning_rate": 1e-4,
    "optim.weight_decay": 0.01,
    "optim.adam_beta1": 0.9,  # torch.optim.AdamW defaults
    "optim.adam_beta2": 0.999,
    "optim.adam_epsilon": 1e-8,
    "optim.lr_schedule": "constant",
    "optim.warmup_steps": 0,
    "optim.max_steps": 12000,
    "optim.batch_size": 4,
    "optim.gradient_accumulation_steps": 1,
    "optim.max_grad_norm": None,  # no clipping
    "optim.mixed_precision": "fp16",
    "optim.unet_precision": "fp32",  # the UNet is never cast; accelerate's autocast runs it
    "optim.drop_text": 0.05,
    "optim.drop_image": 0.05,
    "optim.drop_both": 0.05,
    "optim.noise_offset": 0.0,
    "validation.scale": 0.75,  # --infer_scale
}
AUTHORS_PLUS = {
    **AUTHORS_SDXL,
    "model.base_model": "SG161222/RealVisXL_V1.0",
    "model.image_encoder": "h94/IP-Adapter/models/image_encoder",
    "model.adapter_init": "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.bin",
    "model.projection": "plus",
    "validation.scale": 0.65,
}


def _value(config, dotted):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


@pytest.mark.parametrize(
    ("name", "expected"), [("train_sdxl.yaml", AUTHORS_SDXL), ("train_sdxl_plus.yaml", AUTHORS_PLUS)]
)
def test_the_shipped_configs_are_the_authors_recipe(name, expected):
    config = load_config(ROOT / "configs" / name)
    got = {key: _value(config, key) for key in expected}
    assert got == expected


def test_defaults_without_a_config_file_are_the_authors_too():
    config = config_from_dict(
        {
            "model": {"base_model": "b", "image_encoder": "e", "adapter_init": "a"},
            "data": {"root": "d"},
            "run": {"output_dir": "o"},
        }
    )
    machine_specific = {
        "optim.mixed_precision",
        "model.base_model",
        "model.image_encoder",
        "model.adapter_init",
    }
    for key, value in AUTHORS_SDXL.items():
        if key not in machine_specific:
            assert _value(config, key) == value, key
    assert config.optim.mixed_precision == "no"  # fp16 needs a GPU; the config files set it


# --- their box check --------------------------------------------------------------------------------


def is_valid_bbox_reference(mask: torch.Tensor, bbox: list[float]) -> bool:
    """The authors' rule written out with loops: mask [1, H, W] (float, as ToTensor gives it)."""
    x1, y1, x2, y2 = bbox
    counts: dict[float, int] = {}
    for y in range(int(y1), int(y2)):
        for x in range(int(x1), int(x2)):
            value = float(mask[0, y, x])
            counts[value] = counts.get(value, 0) + 1
    if len(counts) > 5 or len(counts) < 2:
        return False
    area = (x2 - x1) * (y2 - y1)
    if max(counts.values()) / area < 0.6:
        return False
    ordered = sorted(counts)  # torch.unique sorts; the first value is left out when finding the object
    dominant = max(ordered[1:], key=lambda v: (counts[v], -ordered.index(v)))
    total = sum(1 for v in mask.flatten().tolist() if v == dominant)
    return total <= area


@pytest.mark.parametrize("shape", [(24, 32), (40, 28)])
def test_authors_box_check_equals_a_loop_reference(shape):
    rng = np.random.default_rng(sum(shape))
    h, w = shape
    for trial in range(60):
        labels = np.zeros((h, w), dtype=np.uint8)
        for label in range(1, rng.integers(1, 7)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            labels[y : y + rng.integers(3, h - y + 1), x : x + rng.integers(3, w - x + 1)] = label
        x1, y1 = rng.uniform(0, w - 6), rng.uniform(0, h - 6)
        box = [x1, y1, rng.uniform(x1 + 3, w), rng.uniform(y1 + 3, h)]
        mask = torch.from_numpy(labels).float().div(255).unsqueeze(0)  # ToTensor of the label PNG
        assert authors_box_check(labels, box) == is_valid_bbox_reference(mask, box), (trial, box)


# --- crop, post-crop filter, crop offset --------------------------------------------------------------


def _record(
    tmp_path: Path, width=120, height=80, boxes=((10, 10, 50, 60), (60, 15, 100, 70)), names=("cat", "dog")
):
    image = np.full((height, width, 3), 200, np.uint8)
    labels = np.zeros((height, width), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        labels[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1] = i + 1
        image[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1] = (40 * i, 90, 20)
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(labels).save(tmp_path / "mask.png")
    objects = tuple(
        ObjectRecord(name, tuple(float(v) for v in box), 0.9 - 0.1 * i, str(tmp_path / "mask.png"))
        for i, (name, box) in enumerate(zip(names, boxes, strict=True))
    )
    return ImageRecord(
        "x",
        str(tmp_path / "img.png"),
        width,
        height,
        "a photo of " + " and ".join(names),
        objects,
        original_size=(600, 400),
    )


def _rules(**kwargs):
    base = dict(
        filters=ObjectFilterConfig(min_area_frac=0.01, max_objects=None, distinct_names=False),
        min_mask_fill=0.0,
        min_subjects=2,
        max_subjects=2,
        authors_box_check=True,
        post_crop_filter=True,
        duplicate_names="drop_sample",
        crop="authors",
        resolution=64,
    )
    return SubjectRules(**{**base, **kwargs})


def test_crop_offset_is_in_stored_pixels_and_the_centre_fallback_is_theirs(tmp_path):
    record = choose_subjects(_record(tmp_path), _rules(), Counter(), label_map=True)
    assert record.crop_region == (10.0, 10.0, 100.0, 70.0)  # the union of every detected box
    settings = SampleSettings(64, 32, rules=_rules(), drop_text=0, drop_image=0, drop_both=0)
    sample = build_sample(record, 0, random.Random(3), settings)
    assert sample.time_ids[:2] == (400, 600) and sample.time_ids[4:] == (64, 64)  # original (h, w), target
    # a square of side 80 holding x 10..100 would need left in [100 - 80, 10]: none, so the centre square
    assert sample.time_ids[2:4] == ((80 - 64) // 2, (120 - 64) // 2)  # the authors' ((H-R)//2, (W-R)//2)
    resized = build_sample(
        record, 0, random.Random(3), SampleSettings(64, 32, rules=_rules(), crop_coords="resized")
    )
    assert resized.time_ids[2:4] == (0, round(20 * 64 / 80))  # the centre square starts at x = 20
    torch.testing.assert_close(resized.pixel_values, sample.pixel_values)

    narrow = _record(tmp_path, boxes=((10, 10, 40, 60), (45, 15, 80, 70)))
    record = choose_subjects(narrow, _rules(), Counter(), label_map=True)
    lefts = {build_sample(record, 0, random.Random(seed), settings).time_ids[3] for seed in range(30)}
    assert lefts == set(range(0, 11))  # every square of side 80 holding x 10..80, in stored pixels
    tops = {build_sample(record, 0, random.Random(seed), settings).time_ids[2] for seed in range(5)}
    assert tops == {0}



def test_subjects_that_fit_no_square_are_skipped_with_their_reason(tmp_path):
    """Without the authors' crop region (a record indexed by the other crop rule), the square must hold
    every box: boxes spanning x 10..100 fit no square of side 80, so the sample is skipped as
    ``no_valid_object`` with a one-line message naming the record. Guards the reason or message lost."""
    from mipadapter.training.samples import SkippedSample, safe_build_sample
    from mipadapter.training.sources import NO_VALID_OBJECT

    for crop in ("authors", "subjects"):
        skipped = safe_build_sample(_record(tmp_path), 5, 1, SampleSettings(64, 32, crop=crop))
        assert isinstance(skipped, SkippedSample) and skipped.index == 5
        assert (skipped.reason, skipped.message) == (NO_VALID_OBJECT, "x: the subjects do not fit one square crop")


@pytest.mark.parametrize("landscape", [True, False])
def test_without_random_crop_the_square_is_the_middle_of_the_allowed_ones(tmp_path, landscape):
    """``random_crop=False`` places the square of side 80 in the middle of the offsets that hold every
    box, rounded down: boxes spanning 11..80 along the long side allow offsets 0..11, so 5 (the other
    side has only 0). Both crop rules (the authors' crop region, and the boxes themselves), on a
    landscape and a portrait image; SDXL's crop offset is (top, left). Guards the middle computed with
    a true division or a difference."""
    boxes = ((11, 10, 40, 60), (45, 15, 80, 70))
    if not landscape:  # the same boxes, transposed
        boxes = tuple((y1, x1, y2, x2) for x1, y1, x2, y2 in boxes)
    width, height = (120, 80) if landscape else (80, 120)
    record = _record(tmp_path, width=width, height=height, boxes=boxes)
    expected = (0, 5) if landscape else (5, 0)  # (top, left)
    fixed = SampleSettings(64, 32, random_crop=False, drop_text=0, drop_image=0, drop_both=0)
    for crop in ("authors", "subjects"):
        sample = build_sample(record, 0, random.Random(0), dataclasses.replace(fixed, crop=crop))
        assert sample.time_ids[2:4] == expected, crop
    chosen = choose_subjects(record, _rules(), Counter(), label_map=True)
    assert chosen.crop_region is not None  # the authors' path through their crop region
    sample = build_sample(chosen, 0, random.Random(0), dataclasses.replace(fixed, rules=_rules()))
    assert sample.time_ids[2:4] == expected

def test_post_crop_filter_and_duplicate_names(tmp_path):
    # a 22x10 box: in the 64-px frame of an 80-px square crop it covers 17.6 x 8 = 140 px ≤ 200
    record = _record(
        tmp_path, boxes=((10, 10, 50, 60), (60, 15, 82, 25), (60, 30, 100, 70)), names=("cat", "cup", "dog")
    )
    rules = _rules(
        max_subjects=2,
        filters=ObjectFilterConfig(min_area_frac=0.001, max_objects=None, distinct_names=False),
    )
    rejected = Counter()
    chosen = choose_subjects(record, rules, rejected, label_map=True)
    assert rejected["post_crop_filter"] == 0  # the centre crop: decided per sample
    sample = build_sample(chosen, 0, random.Random(0), SampleSettings(64, 32, rules=rules))
    assert sample.names == ["cat", "dog"]  # the cup fails the post-crop filter, the dog takes its place
    assert final_subjects(chosen.objects, (20, 0, 80), rules, rejected)[1].name == "dog"
    assert rejected["post_crop_filter"] == 1
    twins = _record(tmp_path, boxes=((10, 10, 50, 60), (60, 15, 100, 70)), names=("dog", "dog"))
    with pytest.raises(DataError) as error:
        build_sample(
            choose_subjects(twins, rules, Counter(), label_map=True),
            0,
            random.Random(0),
            SampleSettings(64, 32, rules=rules),
        )
    assert error.value.reason == DUPLICATE_NAMES


def test_exif_turned_training_image_gives_the_same_sample(tmp_path):
    upright = _record(tmp_path)
    stored = tmp_path / "turned.jpg"
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 8  # "rotate 90° counter-clockwise to display"
    Image.open(upright.image).transpose(Image.Transpose.ROTATE_270).save(
        stored, exif=exif.tobytes(), quality=100
    )
    Image.open(upright.image).save(tmp_path / "same.jpg", quality=100)  # the same JPEG coding, upright
    from mipadapter.training.sources import image_size

    assert image_size(stored, "turned") == (120, 80)
    settings = SampleSettings(64, 32, rules=_rules(), drop_text=0, drop_image=0, drop_both=0)
    record = choose_subjects(upright, _rules(), Counter(), label_map=True)
    a = build_sample(
        dataclasses.replace(record, image=str(tmp_path / "same.jpg")), 0, random.Random(1), settings
    )
    b = build_sample(dataclasses.replace(record, image=str(stored)), 0, random.Random(1), settings)
    torch.testing.assert_close(a.pixel_values, b.pixel_values, atol=0.08, rtol=0)  # JPEG rounding only
    assert (a.pixel_values - b.pixel_values).abs().mean() < 0.01


# --- views --------------------------------------------------------------------------------------------


def test_views_are_the_reference_then_crops_of_the_same_segment(tmp_path):
    record = _record(tmp_path)
    image = np.asarray(Image.open(record.image))
    labels = np.asarray(Image.open(tmp_path / "mask.png"))
    square = segment_square(image, labels == 1, record.objects[0].box)
    settings = SampleSettings(64, 32, flip_prob=0.0, view_min_scale=0.5)
    views = reference_views(square, 3, 0.5, random.Random(0), settings)
    assert len(views) == 3 and all(v.shape == (3, 32, 32) for v in views)
    from mipadapter.training.samples import reference_image

    torch.testing.assert_close(
        views[0],
        reference_image(image, labels == 1, record.objects[0].box, 32, False, settings.mean, settings.std),
    )
    assert not torch.allclose(views[1], views[0]) and not torch.allclose(views[2], views[1])



def test_a_flipped_reference_is_the_mirror_image():
    """``flip`` mirrors the reference left to right (before the resize, so the mirror of the unflipped
    one up to the resampling's rounding), and a view with ``flip_prob=1`` is that flipped reference.
    Guards the flag not passed on (the reference then never flipped)."""
    from mipadapter.training.samples import reference_image

    rng = np.random.default_rng(4)
    for height, width in ((40, 56), (48, 30)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        rows, cols = np.mgrid[:height, :width]
        mask = cols < rows * width / height  # a triangle: no mirror symmetry
        box = (2, 3, width - 4, height - 2)
        settings = SampleSettings(64, 32, flip_prob=1.0)
        plain = reference_image(image, mask, box, 32, False, settings.mean, settings.std)
        flipped = reference_image(image, mask, box, 32, True, settings.mean, settings.std)
        assert not torch.allclose(flipped, plain, atol=0.1)
        torch.testing.assert_close(flipped, plain.flip(-1), rtol=0, atol=0.05)
        (view,) = reference_views(segment_square(image, mask, box), 1, 0.5, random.Random(0), settings)
        torch.testing.assert_close(view, flipped)

# --- the step: a dropped Plus image, views as conditions -------------------------------------------------


def test_a_dropped_plus_image_gives_the_pipelines_unconditional_tokens():
    """train_sdxl_plus.py zeroes the normalised pixels of a dropped sample and encodes them; the
    inference pipeline's unconditional half does the same, so the resampler's tokens agree."""
    from mipadapter.pipeline.encoding import unconditional_features
    from mipadapter.testing.mip import tiny_mip_pipeline
    from mipadapter.training.step import encode_dropped

    mip = tiny_mip_pipeline("sdxl", "plus")
    encoder, adapter = mip.image_encoder, mip.adapter
    side = encoder.config.image_size
    references = torch.randn(3, 2, 3, side, side, generator=torch.Generator().manual_seed(0))
    drop = torch.tensor([False, True, False])
    with torch.no_grad():
        features = encode_dropped(encoder, references, drop, hidden_states=True)  # [3, 2, L, D]
        trained = adapter.project(features[1])  # the dropped sample's two subjects
        pipeline = adapter.project(
            unconditional_features(encoder, mip.feature_extractor, True, features[0, :1])
        )
        kept = adapter.project(features[0])
    torch.testing.assert_close(trained, pipeline.expand_as(trained), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kept, pipeline.expand_as(kept))  # kept samples are not touched
    zeroed_embeds = encode_dropped(
        tiny_mip_pipeline("sdxl", "basic").image_encoder, references, drop, hidden_states=False
    )
    assert zeroed_embeds[1].abs().sum() == 0 and zeroed_embeds[0].abs().sum() > 0  # basic: zero embeds


def test_identical_views_route_like_one_photo():
    """K views of a subject are K conditions with a 1/K share each: K copies of one photo's features
    predict what the photo alone predicts (the multi_image="each" routing)."""
    from mipadapter.config import AdapterConfig
    from mipadapter.modeling import MIPAdapter
    from mipadapter.testing import TINY_SDXL, tiny_sdxl_pipeline
    from mipadapter.training.step import AdapterUNet

    torch.manual_seed(0)
    unet = tiny_sdxl_pipeline().unet.double()
    config = AdapterConfig("basic", TINY_SDXL.basic_image_encoder.projection_dim, 96, 4, text_weight=True)
    adapter = MIPAdapter.for_unet(unet, config).double()
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    adapter.attach(unet)
    try:
        model = AdapterUNet(unet, adapter, "official")
        g = torch.Generator().manual_seed(1)

        def rand(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        latents, prompt, features = rand(1, 4, 8, 8), rand(1, 77, 96), rand(1, 2, 40)
        added = {"text_embeds": rand(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]]).double()}
        names, mask, subjects = (
            rand(1, 2, 1, 96),
            torch.ones(1, 2, 1, dtype=torch.bool),
            torch.ones(1, 2, dtype=torch.bool),
        )
        one = model(latents, torch.tensor([400]), prompt, added, features, subjects, names, mask)
        three = model(
            latents,
            torch.tensor([400]),
            prompt,
            added,
            features.repeat_interleave(3, dim=1),
            subjects,
            names,
            mask,
            3,
        )
        torch.testing.assert_close(three, one, rtol=1e-10, atol=1e-12)
        different = torch.cat(
            [features[:, :1], rand(1, 1, 40), rand(1, 1, 40), features[:, 1:].repeat(1, 3, 1)], 1
        )
        assert not torch.allclose(
            model(latents, torch.tensor([400]), prompt, added, different, subjects, names, mask, 3), one
        )
    finally:
        adapter.detach()


# --- the loop: precision, single-object multi-view ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mipadapter.testing import TINY_SDXL, tiny_checkpoint_files, tiny_sdxl_pipeline

    tmp = tmp_path_factory.mktemp("recipe")
    write_authors_layout(tmp / "data", 6)
    pipe = tiny_sdxl_pipeline()
    encoder, _ = TINY_SDXL.basic_image_encoder.build()
    files = tiny_checkpoint_files(tmp / "ckpt", pipe, dtype=None)
    return tmp, pipe, encoder, files


def _train(tiny_run, out, data=None, **optim):
    from mipadapter.training.components import components_from_pipeline
    from mipadapter.training.loop import train

    tmp, pipe, encoder, files = tiny_run
    config = config_from_dict(
        {
            "model": {"base_model": "-", "image_encoder": "-", "adapter_init": str(files.basic_bin)},
            "data": {
                "root": str(tmp / "data"),
                "resolution": 64,
                "num_workers": 0,
                "scan_workers": 1,
                **(data or {}),
            },
            "optim": {"batch_size": 2, "max_steps": 1, **optim},
            "run": {"output_dir": str(out), "progress_bar": False, "tensorboard": False},
            "export": {"formats": ["mipadapter"], "dtype": "fp32"},
        }
    )
    components = components_from_pipeline(pipe, encoder)
    seen = {}

    def on_step(step, loss):
        seen["unet"] = next(components.unet.parameters()).dtype

    try:
        result = train(config, components=components, on_step=on_step)
    finally:  # the loop moves the caller's models to the run's dtypes: give the shared ones back
        pipe.to(torch.float32)
        encoder.float()
    return result, seen


@pytest.mark.parametrize(("unet_precision", "expected"), [("fp32", torch.float32), ("mixed", torch.bfloat16)])
def test_the_frozen_unet_stays_float32_under_autocast_by_default(
    tiny_run, tmp_path, unet_precision, expected
):
    # bf16 autocast runs on CPUs (accelerate's one precision per process is reset around each test)
    result, seen = _train(tiny_run, tmp_path / "run", mixed_precision="bf16", unet_precision=unet_precision)
    assert result.finished and seen["unet"] == expected
    from mipadapter.checkpoint import read_file

    state = read_file(result.last_checkpoint / "adapter.safetensors").state
    assert {v.dtype for v in state.values()} == {torch.float32}  # trainable parameters in float32


def test_single_object_multi_view_training_runs_and_its_export_loads(tiny_run, tmp_path):
    from mipadapter.checkpoint import load_adapter
    from mipadapter.pipeline import MIPAdapterPipeline, Subject

    result, _ = _train(
        tiny_run, tmp_path / "single", data={"min_subjects": 1, "max_subjects": 1, "views": 3}, max_steps=2
    )
    assert result.finished and result.step == 2
    tmp, pipe, encoder, _ = tiny_run
    adapter = load_adapter(result.exports["mipadapter"], pipe.unet)
    from mipadapter.testing.mip import tiny_parts

    _, _, processor = tiny_parts("sdxl", "basic")
    mip = MIPAdapterPipeline(pipe, adapter, encoder, processor)
    try:
        photos = [Image.open(tmp / "data" / "images" / f"sa_{k}.png") for k in (1, 4)]
        out = mip(
            "a photo of a ball",
            [Subject("ball", photos)],
            multi_image="each",
            num_inference_steps=1,
            output_type="np",
        )
        assert out.images.shape == (1, 64, 64, 3)
    finally:
        mip.unload()


def test_the_training_image_is_the_crop_resized_bilinearly(tmp_path):
    """pixel_values are the square crop resized to the training side with Pillow's bilinear filter (the
    references use bicubic), scaled to [-1, 1]. Guards the filter dropped (Pillow's default for
    ``resize`` is bicubic)."""
    record = _record(tmp_path, boxes=((11, 10, 40, 60), (45, 15, 80, 70)))
    settings = SampleSettings(64, 32, random_crop=False, crop="subjects", drop_text=0, drop_image=0, drop_both=0)
    sample = build_sample(record, 0, random.Random(0), settings)
    top, left = sample.time_ids[2:4]
    crop = Image.open(record.image).convert("RGB").crop((left, top, left + 80, top + 80))
    for resample, same in ((Image.BILINEAR, True), (Image.BICUBIC, False)):
        expected = torch.from_numpy(np.array(crop.resize((64, 64), resample))).permute(2, 0, 1) / 127.5 - 1
        assert torch.allclose(sample.pixel_values, expected.float(), atol=1e-5) == same, resample


def test_a_segment_low_in_a_portrait_image_is_cut_whole():
    """On a portrait image the box is clamped to the image's height, not its width: a box reaching
    y = 110 of a 60×120 image gives a segment 100 rows tall, padded to a 100-px square. Guards the
    clamp taken from the wrong side."""
    image = np.random.default_rng(2).integers(0, 256, (120, 60, 3), dtype=np.uint8)
    mask = np.ones((120, 60), dtype=bool)
    square = segment_square(image, mask, (10, 10, 50, 110))
    assert square.shape == (100, 100, 3)
    np.testing.assert_array_equal(square[:, 30:70], image[10:110, 10:50])


def test_a_wide_segment_is_centred_vertically_on_white():
    """segment_square for a box wider than tall: the segment sits in the middle rows of its square, white
    above and below it and where the mask is off (the portrait case above centres the columns)."""
    image = np.random.default_rng(3).integers(0, 255, (60, 120, 3), dtype=np.uint8)
    mask = np.ones((60, 120), dtype=bool)
    mask[20, 30] = False
    square = segment_square(image, mask, (10, 10, 110, 50))  # 100 wide, 40 tall
    assert square.shape == (100, 100, 3)
    expected = image[10:50, 10:110].copy()
    expected[10, 20] = 255
    np.testing.assert_array_equal(square[30:70], expected)
    assert (square[:30] == 255).all() and (square[70:] == 255).all()


@pytest.mark.parametrize(("side", "min_scale", "flip_prob"), [(37, 0.3, 0.5), (1, 0.1, 0.0), (2, 0.05, 1.0)])
def test_each_view_is_a_random_square_crop_replayed_from_the_same_draws(side, min_scale, flip_prob):
    """reference_views against a replay of its draws: the first view the whole square, each further one
    a square crop of round(side·U(min_scale, 1)) pixels (at least one) at a random corner within the
    square, each flipped on its own draw; on squares of 37, 2 and 1 pixels (where a crop of two pixels
    would not fit)."""
    from mipadapter.training.samples import finish_reference

    square = np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)
    settings = SampleSettings(64, 16, flip_prob=flip_prob, view_min_scale=min_scale)
    views = reference_views(square, 5, min_scale, random.Random(11), settings)
    replay, expected = random.Random(11), []
    for view in range(5):
        crop = square
        if view > 0:
            cut = max(1, round(side * replay.uniform(min_scale, 1.0)))
            top, left = replay.randint(0, side - cut), replay.randint(0, side - cut)
            crop = square[top : top + cut, left : left + cut]
        flip = replay.random() < flip_prob
        expected.append(finish_reference(crop, 16, flip, settings.mean, settings.std))
    assert len(views) == 5
    for got, want in zip(views, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
