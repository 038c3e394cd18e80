"""Each transformers backend on tiny random models built from configs (offline), output shapes checked."""

from __future__ import annotations

import pytest
import torch
from data_fakes import make_sa1b_shards
from PIL import Image

from mipadapter.data import DataConfig, build_dataset
from mipadapter.data.backends import load_backends, resolve_dtype
from mipadapter.data.backends.blip2 import Blip2Captioner
from mipadapter.data.backends.clip import ClipEmbedder
from mipadapter.data.backends.grounding_dino import GroundingDinoGrounder, _clean
from mipadapter.data.backends.sam import SamSegmenter
from mipadapter.data.stages import Backends, Detection
from mipadapter.manifest import read_manifest
from mipadapter.object_filters import ObjectFilterConfig
from mipadapter.testing import tiny_data_models as tiny

IMAGES = [
    Image.new("RGB", (64, 48), (200, 30, 30)),
    Image.new("RGB", (40, 70), (30, 200, 30)),
    Image.new("RGB", (50, 50), (10, 10, 200)),
]


@pytest.fixture(scope="module")
def models():
    return {
        "blip2": tiny.tiny_blip2(),
        "dino": tiny.tiny_grounding_dino(),
        "sam": tiny.tiny_sam(),
        "clip": tiny.tiny_clip(),
    }


def test_blip2_captioner(models):
    captioner = Blip2Captioner(models["blip2"].model, models["blip2"].processor, max_new_tokens=4)
    captions = captioner.caption(IMAGES)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captioner.caption([]) == []
    prompted = Blip2Captioner(
        models["blip2"].model, models["blip2"].processor, max_new_tokens=2, prompt="a photo of"
    )
    assert len(prompted.caption(IMAGES[:2])) == 2


def test_grounding_dino_grounder(models):
    grounder = GroundingDinoGrounder(
        models["dino"].model, models["dino"].processor, box_threshold=0.0, text_threshold=0.0
    )
    found = grounder.ground(IMAGES, [["cat", "dog"], ["car"], []])
    assert len(found) == 3
    num_queries = models["dino"].model.config.num_queries
    for image, detections in zip(IMAGES[:2], found[:2], strict=True):
        assert len(detections) == num_queries  # threshold 0 keeps every query
        for d in detections:
            assert isinstance(d, Detection) and len(d.box) == 4 and 0.0 <= d.score <= 1.0
            x1, y1, x2, y2 = d.box
            assert -1e-3 <= x1 <= x2 <= image.width + 1e-3 and -1e-3 <= y1 <= y2 <= image.height + 1e-3
            assert "[SEP]" not in d.name and "[CLS]" not in d.name
    assert found[2] == []  # no phrase, nothing to ground
    with pytest.raises(ValueError, match="3 images but 2 phrase lists"):
        grounder.ground(IMAGES, [["cat"], ["dog"]])


def test_grounding_labels_are_cleaned():
    assert _clean("car [SEP]", ["[SEP]", "[CLS]"]) == "car"
    assert _clean("[CLS] red car .", ["[SEP]", "[CLS]"]) == "red car"


def test_sam_segmenter(models):
    segmenter = SamSegmenter(models["sam"].model, models["sam"].processor)
    boxes = [
        torch.tensor([[1.0, 2.0, 40.0, 30.0], [0.0, 0.0, 64.0, 48.0]]),
        torch.zeros((0, 4)),
        torch.tensor([[5.0, 5, 20, 45]]),
    ]
    masks = segmenter.segment(IMAGES, boxes)
    assert [tuple(m.shape) for m in masks] == [(2, 48, 64), (0, 70, 40), (1, 50, 50)]
    assert all(m.dtype == torch.bool for m in masks)
    # the prompt decoder sees each image's own boxes: one image alone gives the same masks
    assert torch.equal(segmenter.segment(IMAGES[2:], boxes[2:])[0], masks[2])
    with pytest.raises(ValueError, match=r"must be \[k, 4\]"):
        segmenter.segment(IMAGES[:1], [torch.zeros(4)])


def test_clip_embedder(models):
    embedder = ClipEmbedder(models["clip"].model, models["clip"].processor, batch_size=2)
    images = embedder.embed_images(IMAGES)
    texts = embedder.embed_texts(["cat", "a photo of a frog", "car"])
    assert images.shape == (3, 12) and texts.shape == (3, 12)
    assert images.dtype == torch.float32 and texts.dtype == torch.float32
    # batching and padding change nothing
    one = ClipEmbedder(models["clip"].model, models["clip"].processor, batch_size=1)
    torch.testing.assert_close(one.embed_images(IMAGES), images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        one.embed_texts(["cat", "a photo of a frog", "car"]), texts, atol=1e-5, rtol=1e-5
    )
    assert embedder.embed_images([]).shape == (0, 12)


def test_load_backends_from_local_folders(models, tmp_path):
    for name, pair in models.items():
        pair.model.save_pretrained(tmp_path / name)
        pair.processor.save_pretrained(tmp_path / name)
    config = DataConfig(
        caption_model=str(tmp_path / "blip2"),
        grounding_model=str(tmp_path / "dino"),
        segment_model=str(tmp_path / "sam"),
        clip_model=str(tmp_path / "clip"),
    )
    backends = load_backends(config, "cpu")
    assert isinstance(backends.captioner, Blip2Captioner) and isinstance(
        backends.grounder, GroundingDinoGrounder
    )
    assert isinstance(backends.segmenter, SamSegmenter) and isinstance(backends.embedder, ClipEmbedder)
    assert next(backends.embedder.model.parameters()).dtype == torch.float32
    torch.testing.assert_close(
        backends.embedder.embed_texts(["cat"]),
        ClipEmbedder(models["clip"].model, models["clip"].processor).embed_texts(["cat"]),
    )
    only_clip = load_backends(config, "cpu", stages=("clip",))
    assert only_clip.captioner is None and only_clip.grounder is None and only_clip.segmenter is None
    with pytest.raises(ValueError, match="unknown stage"):
        load_backends(config, "cpu", stages=("detect",))


def test_dtype_follows_the_device():
    assert resolve_dtype("auto", "cuda") == torch.float16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_build_runs_end_to_end_on_tiny_models(models, tmp_path):
    """The real stages wired together: random weights give random objects, but every record is consistent."""
    backends = Backends(
        captioner=Blip2Captioner(models["blip2"].model, models["blip2"].processor, max_new_tokens=3),
        grounder=GroundingDinoGrounder(
            models["dino"].model, models["dino"].processor, box_threshold=0.0, text_threshold=0.0
        ),
        segmenter=SamSegmenter(models["sam"].model, models["sam"].processor),
        embedder=ClipEmbedder(models["clip"].model, models["clip"].processor),
    )
    lenient = ObjectFilterConfig(
        min_area_frac=None,
        max_area_frac=None,
        min_aspect_ratio=None,
        max_aspect_ratio=None,
        min_score=None,
        name_in_caption=False,
        single_word_names=False,
        distinct_names=False,
        nested_overlap=None,
        max_objects=3,
    )
    config = DataConfig(phrases="caption", filters=lenient, mode="single", top_k=3, batch_size=4)
    source = make_sa1b_shards(tmp_path / "in")
    report = build_dataset(
        source, tmp_path / "out", config, backends=backends, rank=0, world_size=1, progress=False
    )
    records = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert report.records == len(records) and report.images_seen == 9
    for record in records:
        assert 1 <= len(record.objects) <= 3 and set(record.scores) == {"s_single", "s_quality"}
        assert all((tmp_path / "out" / o.mask).exists() and -1 <= o.clip_score <= 1 for o in record.objects)
