"""The CLIP / DINO feature encoders on tiny random models (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FeatureEncoders,
    preprocess_images,
)
from mipadapter.eval.api import tiny_encoders


@pytest.fixture(scope="module")
def encoders():
    return tiny_encoders()


def test_preprocess_resizes_crops_and_normalises():
    white = Image.new("RGB", (80, 40), (255, 255, 255))
    pixels = preprocess_images(
        [white, white.convert("L")], resize=36, crop=32, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[0, :, 5, 5], expected)
    torch.testing.assert_close(pixels[0], pixels[1])  # grey input is converted to RGB


def test_preprocess_centre_crops_the_long_side():
    photo = np.zeros((20, 60, 3), dtype=np.uint8)
    photo[:, 20:40] = 255  # a white middle third, exactly the centre crop after resizing 20 → 20
    pixels = preprocess_images([Image.fromarray(photo)], resize=20, crop=20, mean=CLIP_MEAN, std=CLIP_STD)
    expected = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 10, 10], expected)
    torch.testing.assert_close(pixels[0, :, 10, 1], expected, atol=0.05, rtol=0)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="crop 40 must not exceed resize 36"):
        preprocess_images([Image.new("RGB", (8, 8))], resize=36, crop=40, mean=CLIP_MEAN, std=CLIP_STD)
    with pytest.raises(TypeError, match="ndarray"):
        preprocess_images([np.zeros((4, 4, 3))], resize=4, crop=4, mean=CLIP_MEAN, std=CLIP_STD)


def test_clip_features_shapes_and_determinism(encoders, photo):
    images = [photo(0), photo(1), photo(0)]
    features = encoders.clip.image_features(images)
    assert features.shape == (3, 12) and features.dtype == torch.float32
    torch.testing.assert_close(features[0], features[2])
    text = encoders.clip.text_features(["photo of a cat", "a dog", "photo of a cat"])
    assert text.shape == (3, 12)
    torch.testing.assert_close(text[0], text[2])
    assert not torch.allclose(text[0], text[1])
    with pytest.raises(TypeError, match="not one string"):
        encoders.clip.text_features("a cat")


def test_clip_image_features_are_the_projected_pooled_output(encoders, photo):
    clip = encoders.clip
    pixels = preprocess_images([photo(3)], resize=32, crop=32, mean=CLIP_MEAN, std=CLIP_STD)
    with torch.no_grad():
        vision = clip.model.vision_model(pixel_values=pixels).pooler_output
        expected = clip.model.visual_projection(vision)
    torch.testing.assert_close(clip.image_features([photo(3)]), expected)


def test_dino_uses_resize_256_over_224_and_the_cls_token(encoders, photo):
    dino = encoders.dino
    assert (dino.crop, dino.resize) == (32, round(32 * 256 / 224))
    pixels = preprocess_images(
        [photo(4)], resize=dino.resize, crop=dino.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )
    with torch.no_grad():
        expected = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(dino.image_features([photo(4)]), expected)


def test_batches_give_the_same_features(encoders, photo):
    images = [photo(i) for i in range(5)]
    whole = encoders.dino.image_features(images)
    encoders.dino.batch_size, saved = 2, encoders.dino.batch_size
    try:
        torch.testing.assert_close(encoders.dino.image_features(images), whole, atol=1e-5, rtol=1e-5)
    finally:
        encoders.dino.batch_size = saved


def test_feature_encoders_load_lazily_once(encoders):
    calls = []

    def clip_factory():
        calls.append("clip")
        return encoders.clip

    lazy = FeatureEncoders(clip_factory, lambda: encoders.dino)
    assert calls == []
    assert lazy.clip is encoders.clip and lazy.clip is encoders.clip
    assert calls == ["clip"]
