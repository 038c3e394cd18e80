import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mipadapter.photos import EXIF_ORIENTATION, PhotoError, open_photo, photo_size, upright, upright_size


def _gradient(width=40, height=24):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _with_orientation(image, orientation, path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, format="PNG", exif=exif)  # PNG keeps pixels exact; Pillow reads its eXIf chunk
    return path


@pytest.mark.parametrize(
    "orientation, turn",
    [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_applied(tmp_path, orientation, turn):
    stored = _gradient()
    path = _with_orientation(stored, orientation, tmp_path / "phone.png")
    opened = open_photo(path)
    expected = stored.transpose(turn)
    assert opened.size == expected.size
    assert np.array_equal(np.asarray(opened), np.asarray(expected))
    with Image.open(path) as raw:  # the API path: a PIL image a user opened without turning it
        assert np.array_equal(np.asarray(upright(raw).convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("orientation, size", [(1, (40, 24)), (3, (40, 24)), (6, (24, 40)), (8, (24, 40))])
def test_upright_size_reads_the_turn_from_the_header(tmp_path, orientation, size):
    path = _with_orientation(_gradient(), orientation, tmp_path / "phone.png")
    assert upright_size(path) == size == open_photo(path).size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_size_is_the_opened_size_for_every_orientation(tmp_path, orientation):
    """Guards against ``upright_size`` knowing only some quarter turns: the transposing orientations 5
    and 7 swap the sides as 6 and 8 do. Fails when the turned set is ``(6, 8)`` instead of ``(5, 6, 7, 8)``
    (the web's size check and the data tools would then see a 40×24 photo that opens as 24×40)."""
    path = _with_orientation(_gradient(), orientation, tmp_path / "phone.png")
    opened = open_photo(path)
    assert upright_size(path) == opened.size
    assert opened.size == ((24, 40) if orientation >= 5 else (40, 24))


def _png_header(path, width, height):
    """A PNG of only its IHDR and IEND chunks: it names a size but holds no pixels (nothing to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_the_default_pixel_limit_is_50_mp(tmp_path):
    """Guards the default limit every caller relies on without passing one: a 56 MP header (8000×7000)
    is refused by ``photo_size``, ``upright_size`` and ``open_photo`` with no argument, a 49 MP one is
    not. Fails when ``DEFAULT_MAX_PIXELS`` is raised (e.g. to 500 MP) or lowered below 49 MP."""
    big = _png_header(tmp_path / "big.png", 8000, 7000)
    message = r"'.*big\.png' is 8000×7000 \(56\.0 MP\), above the 50 MP limit"
    for read in (photo_size, upright_size, open_photo):
        with pytest.raises(PhotoError, match=message):
            read(big)
    assert photo_size(_png_header(tmp_path / "fits.png", 7000, 7000)) == (7000, 7000)
    assert photo_size(big, max_pixels=None) == (8000, 7000)  # the limit is the default, not a ceiling


def test_upright_image_is_returned_as_is():
    image = _gradient()
    assert upright(image) is image


def test_refused_by_header_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    _gradient(200, 100).save(path)
    assert photo_size(path, max_pixels=20_000) == (200, 100)
    with pytest.raises(PhotoError, match=r"'.*big.png' is 200×100 \(0.0 MP\), above the 0.01 MP limit"):
        open_photo(path, max_pixels=10_000)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(PhotoError, match=r"^photo '.*' is a folder"):
        open_photo(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^--subject cat '.*nope.jpg' not found"):
        open_photo(tmp_path / "nope.jpg", "--subject cat")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(PhotoError, match=r"'.*notes.jpg' is not an image"):
        open_photo(text)
    buffer = io.BytesIO()
    _gradient(64, 64).save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(PhotoError, match=r"'.*cut.jpg' cannot be decoded: image file is truncated"):
        open_photo(truncated)


def test_mode(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (8, 8), 7).save(path)
    assert open_photo(path).mode == "RGB"
    assert open_photo(path, mode=None).mode == "L"


# ----------------------------------------------------------------------------------------------- issue 18
def _uint16_gradient(width=256, height=32):
    """A horizontal 0 … 65535 ramp (mean 32767.5, i.e. 127.5 on 8 bits)."""
    return np.tile(np.linspace(0, 65535, width), (height, 1)).astype(np.uint16)


def test_a_16_bit_gradient_keeps_its_full_range(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(_uint16_gradient()).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what the test is about: Pillow's own convert clips this to white
    photo = np.asarray(open_photo(path), dtype=np.float64)
    assert abs(photo.mean() - 127.5) <= 0.02 * 127.5, photo.mean()
    assert photo.min() == 0 and photo.max() == 255
    mask = np.asarray(open_photo(path, mode="L"), dtype=np.float64)
    assert abs(mask.mean() - 127.5) <= 0.02 * 127.5
    assert np.all(np.diff(mask[0]) >= 0)  # a ramp stays a ramp: no clipping plateau
    assert (mask[0] == 255).sum() <= 2


@pytest.mark.parametrize(
    "make",
    [
        lambda ramp: Image.fromarray(ramp.astype(np.int32), mode="I"),  # 16-bit files in older Pillow
        lambda ramp: Image.fromarray((ramp / 65535).astype(np.float32), mode="F"),  # floats in 0 … 1
        lambda ramp: Image.fromarray((ramp / 257).astype(np.float32), mode="F"),  # floats in 0 … 255
    ],
    ids=["I", "F 0-1", "F 0-255"],
)
def test_integer_and_float_modes_keep_their_full_range(tmp_path, make):
    from mipadapter.photos import to_mode

    image = make(_uint16_gradient().astype(np.float64))
    for mode in ("RGB", "L"):
        values = np.asarray(to_mode(image, mode), dtype=np.float64)
        assert abs(values.mean() - 127.5) <= 0.02 * 127.5, (image.mode, mode, values.mean())


def test_transparency_is_flattened_over_white_for_photos_and_black_for_masks(tmp_path):
    grey = np.full((8, 8), 100, np.uint8)
    alpha = np.zeros((8, 8), np.uint8)
    alpha[:, :4] = 255  # left half opaque grey, right half transparent
    la = tmp_path / "la.png"
    Image.fromarray(np.stack([grey, alpha], -1), mode="LA").save(la)
    palette = tmp_path / "p.png"
    indexed = Image.fromarray((alpha == 0).astype(np.uint8), mode="P")  # index 1 = transparent
    indexed.putpalette([100, 100, 100, 0, 0, 0] + [0] * 762)
    indexed.save(palette, transparency=1)
    for path in (la, palette):
        photo = np.asarray(open_photo(path))
        assert (photo[:, :4] == 100).all() and (photo[:, 4:] == 255).all(), path.name
        mask = np.asarray(open_photo(path, mode="L"))
        assert (mask[:, :4] == 100).all() and (mask[:, 4:] == 0).all(), path.name


def test_a_fifo_or_a_folder_is_named_as_such_and_never_opened(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would block this test forever
    with pytest.raises(PhotoError, match=r"^photo '.*pipe\.png' is a named pipe \(FIFO\), not a photo$"):
        open_photo(fifo)
    with pytest.raises(PhotoError, match=r"^photo '.*' is a folder, not a photo$"):
        photo_size(tmp_path)


def test_encoded_bytes_are_refused_by_their_header_too():
    buffer = io.BytesIO()
    Image.new("L", (3000, 2000)).save(buffer, format="PNG")
    with pytest.raises(PhotoError, match=r"^embedded mask is 3000×2000 \(6\.0 MP\), above the 5 MP limit"):
        open_photo(buffer.getvalue(), "embedded mask", mode="L", max_pixels=5_000_000)
    assert open_photo(buffer.getvalue(), "embedded mask", mode="L").size == (3000, 2000)
    with pytest.raises(PhotoError, match=r"^embedded mask is not an image file Pillow can read$"):
        open_photo(b"not a png", "embedded mask")


def _mask_cases():
    """(name, image, the labels every mask reader must return)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(7, 9)).astype(np.uint8)
    colour = np.zeros((7, 9, 3), np.uint8)
    colour[..., 1] = (labels > 0) * 200  # green only: a red-channel reader sees nothing
    colour[..., 2] = (labels == 3) * 50
    return [
        ("grey label map", Image.fromarray(labels), labels),
        ("grey label map saved as RGB", Image.fromarray(np.stack([labels] * 3, -1)), labels),
        ("label map with alpha", Image.fromarray(np.stack([labels, np.full_like(labels, 255)], -1), "LA"), labels),
        ("colour mask", Image.fromarray(colour), (labels > 0).astype(np.uint8)),
        ("colour mask with alpha", Image.fromarray(np.dstack([colour, np.full_like(labels, 255)])), (labels > 0).astype(np.uint8)),
        ("16-bit label map", Image.fromarray(labels.astype(np.uint16) * 1000), labels.astype(np.uint16) * 1000),
        ("mode 1", Image.fromarray(labels > 0), (labels > 0).astype(np.uint8)),
    ]


@pytest.mark.parametrize("name, image, want", _mask_cases(), ids=[case[0] for case in _mask_cases()])
def test_the_data_build_and_training_read_a_mask_as_the_same_labels(tmp_path, name, image, want):
    """Guards the two readers drifting apart again: the data build took channel 0 of a colour mask (a
    green-only mask read as empty) and training took any channel (an RGB label map's labels merged
    into one object)."""
    from mipadapter.data.masks import read_label_map
    from mipadapter.training.sources import load_label_map

    path = tmp_path / "mask.png"
    image.save(path)
    built, trained = read_label_map(str(path)), load_label_map(path)
    assert built.dtype == trained.dtype == want.dtype
    assert np.array_equal(built, want) and np.array_equal(trained, want)


def test_a_float_mask_is_refused_by_both_readers_naming_the_file(tmp_path):
    from mipadapter.data.masks import read_label_map
    from mipadapter.training.sources import DataError, load_label_map

    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((4, 5), 0.5, np.float32), "F").save(path)
    with pytest.raises(ValueError, match=r"mask .*float\.tiff: float32 pixels are not integer labels"):
        read_label_map(str(path))
    with pytest.raises(DataError, match=r"float\.tiff: float32 pixels are not integer labels"):
        load_label_map(path)
