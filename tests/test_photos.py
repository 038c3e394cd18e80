import io
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mipadapter.photos import EXIF_ORIENTATION, PhotoError, open_photo, photo_size, upright, upright_size


def _gradient(width=40, height=24, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _with_orientation(image, orientation, path):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    image.save(path, format="PNG", exif=exif)  # PNG keeps pixels exact; Pillow reads its eXIf chunk
    return path


# orientation → the transpose that makes the stored pixels upright (None: they are)
TURNS = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("orientation", sorted(TURNS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    """Every EXIF orientation turns the pixels as the EXIF standard says, through ``open_photo`` and
    through ``upright`` (a PIL image a user opened); ``turn=False`` keeps the stored frame (it guards
    turning regardless of ``turn``: boxes recorded in the stored frame would then cut the wrong place);
    an upright image (orientation 1 written, or none) is given back as itself, not copied."""
    for seed, size in [(0, (40, 24)), (1, (9, 14))]:
        stored = _gradient(*size, seed=seed)
        path = _with_orientation(stored, orientation, tmp_path / f"phone{seed}.png")
        turn = TURNS[orientation]
        expected = stored if turn is None else stored.transpose(turn)
        opened = open_photo(path)
        assert opened.size == expected.size
        assert np.array_equal(np.asarray(opened), np.asarray(expected))
        kept = open_photo(path, turn=False)
        assert np.array_equal(np.asarray(kept), np.asarray(stored))
        assert kept.getexif()[EXIF_ORIENTATION] == orientation  # for ``upright`` later
        assert np.array_equal(np.asarray(upright(kept)), np.asarray(expected))
        with Image.open(path) as raw:  # the API path: a PIL image a user opened without turning it
            raw.load()
            turned = upright(raw)
            assert np.array_equal(np.asarray(turned.convert("RGB")), np.asarray(expected))
            assert (turned is raw) == (orientation == 1)


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


# ----------------------------------------------------------------------------------------------- issue 23
def _exactly(message):
    """A ``match`` pattern for exactly ``message`` (paths hold dots and dashes)."""
    return "^" + re.escape(message) + "$"


def _fake_stat(monkeypatch, target, file_type):
    """``os.stat`` of ``target`` answering a file of ``file_type`` (``stat.S_IF*``): the kinds this test
    cannot make without root (a block device) or on Linux at all (a Solaris door, 0o150000)."""
    import os

    real = os.stat

    def fake(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(target):
            return os.stat_result((file_type | 0o644, 0, 0, 1, 0, 0, 0, 0, 0, 0))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", fake)


def test_every_kind_of_path_that_is_not_a_file_is_named_as_such(tmp_path, monkeypatch):
    """Guards the names ``special_kind`` gives (in the one-line error of every reader) and the tests
    that find them: a socket, a character device (/dev/null), a block device and a kind Linux does not
    have each named as what it is, never opened; a regular file and a missing path are not special."""
    import socket
    import stat

    from mipadapter.photos import check_is_file, special_kind

    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "s.sock"))
    try:
        paths = {"a socket": tmp_path / "s.sock", "a device": "/dev/null", "a folder": tmp_path}
        for kind, path in paths.items():
            assert special_kind(path) == kind
            with pytest.raises(PhotoError, match=_exactly(f"photo {str(path)!r} is {kind}, not a photo")):
                photo_size(path)
    finally:
        unix.close()
    block, door = tmp_path / "disk", tmp_path / "door"
    block.write_bytes(b"")
    door.write_bytes(b"")
    for path, file_type, kind in [(block, stat.S_IFBLK, "a device"), (door, 0o150000, "not a regular file")]:
        with monkeypatch.context() as patched:
            _fake_stat(patched, path, file_type)
            assert special_kind(path) == kind
            message = f"--subject cat {str(path)!r} is {kind}, not a photo"
            with pytest.raises(PhotoError, match=_exactly(message)):
                check_is_file(path, "--subject cat")
    assert special_kind(block) is None and check_is_file(str(block)) == block
    assert special_kind(tmp_path / "nope.png") is None


UNREADABLE, FOLDER = "is not an image file Pillow can read", "is a folder, not a photo"


def test_each_reader_names_a_photo_photo_unless_told_otherwise(tmp_path):
    """Guards the default ``what`` of ``check_is_file``, ``image_size``, ``photo_size`` and
    ``upright_size``, and ``upright_size`` passing its own ``what`` and ``max_pixels`` on (not None, not
    the limit in the name's place, not the default limit)."""
    from mipadapter.photos import check_is_file, image_size

    missing, text = tmp_path / "nope.png", tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(FileNotFoundError, match=_exactly(f"photo {str(missing)!r} not found")):
        check_is_file(missing)
    for read in (image_size, photo_size, upright_size):
        with pytest.raises(PhotoError, match=_exactly(f"photo {str(text)!r} {UNREADABLE}")):
            read(text)
        with pytest.raises(PhotoError, match=_exactly(f"photo {str(tmp_path)!r} {FOLDER}")):
            read(tmp_path)
        with pytest.raises(PhotoError, match=_exactly(f"--subject cat {str(tmp_path)!r} {FOLDER}")):
            read(tmp_path, "--subject cat")
    path = tmp_path / "wide.png"
    _gradient(200, 100).save(path)
    limit = "is 200×100 (0.0 MP), above the 0.01 MP limit: downscale it, or raise the limit"
    with pytest.raises(PhotoError, match=_exactly(f"cat {str(path)!r} {limit}")):
        upright_size(path, "cat", max_pixels=10_000)
    assert upright_size(path, "cat", max_pixels=20_000) == (200, 100)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_header_that_cannot_be_read_is_named_with_pillows_reason(tmp_path):
    """Guards the messages of a header Pillow refuses: past twice Pillow's own pixel limit (200 MP, even
    with no limit of ours), a PNG cut inside its header chunk (an ``OSError``) and a header chunk too
    short (Pillow raises ``ValueError``, which escaped as a bare "Truncated IHDR chunk"): one line naming
    the file, or an embedded mask by its ``what``; nothing is decoded."""
    huge = _png_header(tmp_path / "huge.png", 20_000, 10_000)
    cut = tmp_path / "cut.png"
    cut.write_bytes(PNG_SIGNATURE + struct.pack(">I", 13) + b"IHDR" + b"\0\0\0\4")
    short = tmp_path / "short.png"
    short.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", b"\0\0\0\4\0") + _chunk(b"IEND", b""))
    cases = [
        (huge, "has more pixels than Pillow will decode"),
        (cut, "cannot be read: Truncated File Read"),
        (short, "cannot be read: Truncated IHDR chunk"),
    ]
    for path, reason in cases:
        for read in (photo_size, upright_size, open_photo):
            with pytest.raises(PhotoError, match=_exactly(f"photo {str(path)!r} {reason}")):
                read(path, max_pixels=None)
        with pytest.raises(PhotoError, match=_exactly(f"embedded mask {reason}")):
            open_photo(path.read_bytes(), "embedded mask", max_pixels=None)


def test_upright_size_names_a_png_whose_pixels_end_early(tmp_path):
    """Guards the message of ``upright_size``'s own read: Pillow looks for a PNG's EXIF after its pixels
    when none comes before them, so a truncated PNG fails there (its header was fine)."""
    for seed, size in [(0, (64, 64)), (1, (40, 90))]:
        buffer = io.BytesIO()
        _gradient(*size, seed=seed).save(buffer, format="PNG")
        path = tmp_path / f"cut{seed}.png"
        path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        assert photo_size(path) == size
        truncated = f"cat {str(path)!r} cannot be read: image file is truncated"
        with pytest.raises(PhotoError, match="^" + re.escape(truncated)):
            upright_size(path, "cat")


def test_mode_none_keeps_the_stored_mode_and_values(tmp_path):
    """Guards converting when ``mode`` is None: a 16-bit, palette or grey+alpha file comes back as
    stored (a conversion would give ``L``, ``RGB`` or a flattened ``RGBA``)."""
    rng = np.random.default_rng(5)
    palette = Image.fromarray(rng.integers(0, 4, (6, 9)).astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    images = {
        "I;16": Image.fromarray(rng.integers(0, 65536, (6, 9)).astype(np.uint16)),
        "P": palette,
        "LA": Image.fromarray(rng.integers(0, 256, (6, 9, 2)).astype(np.uint8), "LA"),
    }
    for mode, image in images.items():
        path = tmp_path / f"{mode.replace(';', '')}.png"
        image.save(path)
        kept = open_photo(path, mode=None)
        assert kept.mode == mode
        assert np.array_equal(np.asarray(kept), np.asarray(image))


@pytest.mark.parametrize("suffix", [".pgm", ".tiff"])
def test_the_returned_photo_does_not_change_with_its_file(tmp_path, suffix):
    """Guards returning Pillow's own image when no conversion made a new one: an uncompressed grey file
    is memory-mapped, so the image would show whatever is written into the file later (a photo saved
    again, an upload's temporary file reused) instead of the pixels that were read."""
    path = tmp_path / f"grey{suffix}"
    stored = np.random.default_rng(7).integers(0, 200, (5, 8)).astype(np.uint8)
    for mode in (None, "L"):
        Image.fromarray(stored).save(path)
        opened = open_photo(path, mode=mode)
        size = path.stat().st_size
        with path.open("r+b") as file:  # in place: the same file, new pixel bytes at its end
            file.seek(size - stored.size)
            file.write(bytes([255]) * stored.size)
        with Image.open(path) as changed:
            assert (np.asarray(changed) == 255).all()  # what the test is about: the file did change
        assert np.array_equal(np.asarray(opened), stored), mode


def test_only_pillows_bomb_warning_is_silenced(tmp_path, monkeypatch):
    """Guards the warning filter of ``open_photo``: a photo over Pillow's own pixel limit with our limit
    off (the web's call) warns of nothing, its size was checked from the header; a warning that says
    something about the file (here Pillow's about a broken EXIF block) still reaches the user."""
    import warnings

    path = tmp_path / "big.png"
    _gradient(12, 10).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 120 pixels: over it, below twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_photo(path, max_pixels=None).size == (12, 10)
    monkeypatch.undo()
    ifd = struct.pack("<HHII", EXIF_ORIENTATION, 3, 1, 6) + struct.pack("<HHII", 0x010F, 2, 100, 5000)
    tiff = b"II*\x00" + struct.pack("<IH", 8, 2) + ifd + struct.pack("<I", 0)  # Make: 100 bytes past the end
    broken = tmp_path / "broken.png"
    _gradient(12, 10).save(broken, exif=b"Exif\x00\x00" + tiff)
    with pytest.warns(UserWarning, match="Truncated File Read"):
        assert open_photo(broken).size == (10, 12)  # the orientation was still read
