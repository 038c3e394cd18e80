import io

import numpy as np
import pytest
from PIL import Image

from mipadapter.photos import EXIF_ORIENTATION, PhotoError, open_photo, photo_size, upright


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
    from mipadapter.photos import upright_size

    path = _with_orientation(_gradient(), orientation, tmp_path / "phone.png")
    assert upright_size(path) == size == open_photo(path).size


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
