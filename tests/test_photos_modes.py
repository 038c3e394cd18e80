"""Pixel modes: ``to_mode`` (high-bit and float images to 8 bits, transparency flattened) and
``mask_labels`` (a mask image as integer labels), checked value by value on tiny images made here."""

import numpy as np
import pytest
from PIL import Image

from mipadapter.photos import mask_labels, open_photo, to_mode

NAN, INF = float("nan"), float("inf")


def _row(values, mode):
    """A 1×N image of ``values`` in ``mode`` ("F": float32, "I": int32, "I;16": uint16)."""
    dtype = {"F": np.float32, "I": np.int32, "I;16": np.uint16}[mode]
    image = Image.fromarray(np.array([values], dtype=dtype))
    assert image.mode == mode
    return image


# (mode, stored values, the 8-bit levels they must become)
EIGHT_BIT_CASES = [
    # floats whose largest is at most 1 are 0 … 1 (1.0 itself included); 0.6 → 153, not 154 (× 256)
    ("F", [0.0, 0.25, 0.6, 1.0, -0.5, NAN], [0, 64, 153, 255, 0, 0]),
    # one value just above 1 makes them 0 … 255: 1.5 stays 2, not 255 (the 0 … 1 rule would take ≤ 2)
    ("F", [0.0, 0.5, 1.5, 2.0], [0, 0, 2, 2]),
    # out of range and non-finite floats: clipped (255.7 rounds to 256, which is 255, not 0), NaN is 0
    ("F", [0.0, 100.4, 255.7, 300.0, -5.0, NAN, INF, -INF], [0, 100, 255, 255, 0, 0, 255, 0]),
    # 32-bit integers are 0 … 65535 too: below 0 is 0, above 65535 is 255 (not wrapped round)
    ("I", [-257, 0, 257, 32896, 65535, 131072], [0, 0, 1, 128, 255, 255]),
    # 16-bit: 65535 / 257 = 255 exactly; 128 rounds down, 129 up
    ("I;16", [0, 128, 129, 25700, 65535], [0, 0, 1, 100, 255]),
]


@pytest.mark.parametrize(
    "mode, values, levels", EIGHT_BIT_CASES, ids=["F 0-1", "F above 1", "F out of range", "I", "I;16"]
)
def test_high_bit_and_float_pixels_become_exact_8_bit_levels(mode, values, levels):
    """Guards the scaling of ``I;16``/``I``/``F`` images: the 0 … 1 test of floats (≤ 1, not ≤ 2, not
    < 1), the factors 255 and 1/257, NaN as 0, ±inf and out-of-range values clipped to 255 and 0 (a
    missing clip wraps 300 to 44 and −5 to 251 in uint8), and a photo ("RGB") being the grey levels in
    three channels, not an ``L`` image."""
    image = _row(values, mode)
    grey = to_mode(image, "L")
    assert grey.mode == "L" and grey.size == image.size
    assert np.asarray(grey).tolist() == [levels]
    photo = to_mode(image, "RGB")
    assert photo.mode == "RGB" and photo.size == image.size
    assert np.asarray(photo).tolist() == [[[level] * 3 for level in levels]]


def test_floats_round_to_the_nearest_level_of_their_exact_value():
    """Guards computing in float32 (the image's own type): v = (k + ½)/255 stored as float32 is a hair
    above or below k + ½ after × 255; float64 rounds it to the nearer level, float32 makes it k + ½
    exactly and rounds it to the even one (half of these 255 values come out one level too low)."""
    stored = ((np.arange(255) + 0.5) / 255).astype(np.float32)
    exact = np.rint(stored.astype(np.float64) * 255)
    assert (exact != np.rint(stored * np.float32(255))).sum() > 100  # what the test is about
    for shape in [(15, 17), (5, 51)]:
        image = Image.fromarray(stored.reshape(shape))
        assert np.array_equal(np.asarray(to_mode(image, "L")), exact.reshape(shape).astype(np.uint8))


def test_an_empty_float_image_converts_to_an_empty_one():
    """Guards taking the maximum of no pixels (numpy refuses it: an empty image raised ValueError)."""
    for size in [(0, 3), (4, 0)]:
        for mode in ("L", "RGB"):
            converted = to_mode(Image.new("F", size), mode)
            assert (converted.mode, converted.size) == (mode, size)


def test_a_16_bit_or_float_file_opens_as_the_levels_of_its_pixels(tmp_path):
    """The same levels through a file (16-bit PNG, float TIFF) and ``open_photo``: mode None keeps the
    stored mode and values, "L" and "RGB" scale them."""
    for mode, values, levels in (EIGHT_BIT_CASES[0], EIGHT_BIT_CASES[2], EIGHT_BIT_CASES[4]):
        image = _row(values, mode)
        path = tmp_path / ("row.tiff" if mode == "F" else "row.png")
        image.save(path)
        kept = open_photo(path, mode=None)
        assert kept.mode == mode
        assert np.array_equal(np.asarray(kept), np.asarray(image), equal_nan=True)
        assert np.asarray(open_photo(path, mode="L")).tolist() == [levels]
        assert np.asarray(open_photo(path)).tolist() == [[[level] * 3 for level in levels]]


def _random_rgb(seed, height=6, width=7):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"])
def test_an_opaque_image_converts_exactly_as_pillow_converts_it(mode):
    """Guards flattening images that have no transparency: ``YCbCr`` → ``L`` through RGBA gives the
    luma of its RGB form, not its own Y channel (off by one level in places)."""
    for seed, size in [(0, (6, 7)), (1, (3, 11))]:
        image = _random_rgb(seed, *size).convert(mode)
        for target in ("RGB", "L"):
            converted = to_mode(image, target)
            assert converted.mode == target
            assert np.array_equal(np.asarray(converted), np.asarray(image.convert(target))), (mode, target)
        assert to_mode(image, mode) is image


def _half_transparent(mode, seed):
    """An image in ``mode`` whose left columns are opaque and right ones fully transparent, and the
    8-bit RGB colours of its pixels."""
    rgb = np.asarray(_random_rgb(seed))
    if mode in ("L", "LA", "La", "P", "PA"):  # grey colours
        rgb = np.repeat(rgb[..., :1], 3, axis=-1)
    opaque = np.zeros(rgb.shape[:2], bool)
    opaque[:, :3] = True
    alpha = opaque.astype(np.uint8) * 255
    if mode in ("LA", "La"):
        image = Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").convert(mode)
    elif mode in ("RGBA", "RGBa"):
        image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA").convert(mode)
    elif mode == "PA":
        image = Image.merge("PA", [Image.fromarray(rgb[..., 0]), Image.fromarray(alpha)])
    else:  # a colour key: the value 1 marks transparent pixels, and only the right columns hold it
        rgb = np.where(rgb == 1, 2, rgb)
        rgb[~opaque] = 1
        if mode == "RGB":
            image = Image.fromarray(rgb)
            image.info["transparency"] = (1, 1, 1)
        else:
            image = Image.frombytes(mode, rgb.shape[1::-1], rgb[..., 0].tobytes())
            image.info["transparency"] = 1
    if image.mode in ("P", "PA"):
        image.putpalette(np.repeat(np.arange(256, dtype=np.uint8), 3).tobytes())  # index i is grey i
    return image, rgb, opaque


@pytest.mark.parametrize("mode", ["LA", "La", "RGBA", "RGBa", "PA", "P", "L", "RGB"])
def test_transparency_of_every_kind_becomes_white_in_a_photo_and_black_in_a_mask(mode):
    """Guards the flattening of each kind of transparency: an alpha band, premultiplied alpha (``La``,
    ``RGBa``: Pillow cannot convert ``La`` to RGBA, and ``RGBa`` converted directly keeps its
    premultiplied black), a palette alpha band (``PA``) and a colour key (``P``, ``L``, ``RGB`` with
    ``transparency``): transparent pixels are white in a photo, black in a mask, opaque ones keep their
    colour (their luma in a mask)."""
    for seed in (0, 1):
        image, rgb, opaque = _half_transparent(mode, seed)
        assert image.mode == mode
        photo = np.asarray(to_mode(image, "RGB"))
        assert np.array_equal(photo[opaque], rgb[opaque]) and (photo[~opaque] == 255).all()
        mask = np.asarray(to_mode(image, "L"))
        luma = np.asarray(Image.fromarray(rgb).convert("L"))
        assert np.array_equal(mask[opaque], luma[opaque]) and (mask[~opaque] == 0).all()


def test_half_transparent_pixels_are_blended_with_the_background():
    """An alpha of 128 gives half the colour and half the background (white for a photo, black for a
    mask), within Pillow's rounding of one level."""
    for colour in (0, 40, 200):
        image = Image.new("LA", (4, 3), (colour, 128))
        photo = np.asarray(to_mode(image, "RGB"), dtype=float)
        assert np.abs(photo - (colour * 128 + 255 * 127) / 255).max() <= 1
        mask = np.asarray(to_mode(image, "L"), dtype=float)
        assert np.abs(mask - colour * 128 / 255).max() <= 1


# ----------------------------------------------------------------------------------------- mask_labels
def _labels(seed, shape=(5, 6)):
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)


def _alpha(seed, shape=(5, 6)):
    return np.random.default_rng(seed + 100).integers(0, 256, size=shape).astype(np.uint8)


@pytest.mark.parametrize("seed, shape", [(0, (5, 6)), (1, (3, 9))])
def test_mask_labels_drops_every_kind_of_alpha_band(seed, shape):
    """Guards reading an alpha band as a colour: an ``La``, ``RGBa`` or ``PA`` mask (premultiplied or
    palette alpha) whose alpha were taken for a channel becomes a 0/1 colour mask (or all ones) instead
    of its labels. Alpha is random where it does not change the stored labels, 255 where it does
    (premultiplied modes)."""
    labels, alpha, opaque = _labels(seed, shape), _alpha(seed, shape), np.full(shape, 255, np.uint8)
    grey = np.dstack([labels] * 3)
    cases = {
        "LA": Image.fromarray(np.dstack([labels, alpha]), "LA"),
        "La": Image.fromarray(np.dstack([labels, opaque]), "LA").convert("La"),
        "RGBA": Image.fromarray(np.dstack([grey, alpha]), "RGBA"),
        "RGBa": Image.fromarray(np.dstack([grey, opaque]), "RGBA").convert("RGBa"),
        "PA": Image.merge("PA", [Image.fromarray(labels), Image.fromarray(alpha)]),
    }
    for mode, image in cases.items():
        assert image.mode == mode
        read = mask_labels(image)
        assert read.dtype == np.uint8 and np.array_equal(read, labels), mode
    colour = np.zeros((*shape, 3), np.uint8)
    colour[..., 0] = (labels == 1) * 9
    colour[..., 2] = (labels == 3) * 200
    premultiplied = Image.fromarray(np.dstack([colour, opaque]), "RGBA").convert("RGBa")
    assert np.array_equal(mask_labels(premultiplied), (labels % 2).astype(np.uint8))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_colour_mask_is_set_wherever_any_channel_is(seed):
    """Guards dropping the last channel of an image without alpha: a blue-only region of an RGB mask
    (or a red- or green-only one) is part of the subject."""
    labels = _labels(seed)
    for channel in range(3):
        colour = np.zeros((*labels.shape, 3), np.uint8)
        colour[..., channel] = (labels > 0) * 255
        colour[..., (channel + 1) % 3] = (labels == 2) * 7  # a second colour: channels differ there too
        read = mask_labels(Image.fromarray(colour))
        assert read.dtype == np.uint8 and np.array_equal(read, (labels > 0).astype(np.uint8)), channel
