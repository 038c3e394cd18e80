"""Input readers: tar pairing and damage, folders, the authors' layout, id lists."""

from __future__ import annotations

import json

import pytest
from data_fakes import png_bytes, sa1b_json, write_tar
from PIL import Image

from mipadapter.data.sources import SkipLog, detect_layout, iter_items, list_shards, read_id_list


def read(shard):
    skips = SkipLog()
    items = list(iter_items(shard, skips))
    return items, dict(skips.counts)


def test_tar_pairs_images_with_their_json_in_any_order(tmp_path):
    image = png_bytes(Image.new("RGB", (4, 4)))
    write_tar(
        tmp_path / "a.tar",
        [
            ("x/sa_2.json", sa1b_json("sa_2")),
            ("x/sa_2.jpg", image),
            ("sa_1.jpg", image),
            ("sa_1.json", sa1b_json("sa_1")),
            ("notes.txt", b"ignored"),
            ("sa_3.jpg", image),
        ],
    )
    (shard,) = list_shards(tmp_path / "a.tar")
    items, skips = read(shard)
    assert [(i.id, i.suffix, i.meta is not None) for i in items] == [
        ("sa_2", ".jpg", True),
        ("sa_1", ".jpg", True),
        ("sa_3", ".jpg", False),
    ]
    assert items[0].data == image and skips == {}


def test_tar_damage_is_counted(tmp_path):
    image = png_bytes(Image.new("RGB", (4, 4)))
    write_tar(
        tmp_path / "a.tar",
        [("sa_1.jpg", image), ("sa_1.json", b"{not json"), ("sa_2.json", sa1b_json("sa_2"))],
    )
    items, skips = read(list_shards(tmp_path / "a.tar")[0])
    assert items == [] and skips == {"corrupt_json": 1, "missing_image": 1}


def test_a_json_nested_too_deep_is_corrupt(tmp_path):
    image = png_bytes(Image.new("RGB", (4, 4)))
    write_tar(tmp_path / "a.tar", [("sa_1.jpg", image), ("sa_1.json", b"[" * 100_000)])
    items, skips = read(list_shards(tmp_path / "a.tar")[0])
    assert items == [] and skips == {"corrupt_json": 1}  # the pair is not trusted


def test_tar_cut_inside_a_header_is_reported(tmp_path):
    image = png_bytes(Image.new("RGB", (4, 4)))
    write_tar(
        tmp_path / "a.tar", [("sa_1.jpg", image), ("sa_1.json", sa1b_json("sa_1")), ("sa_2.jpg", image)]
    )
    raw = (tmp_path / "a.tar").read_bytes()
    header = raw.index(b"sa_2.jpg")
    (tmp_path / "a.tar").write_bytes(raw[: header + 100])  # cut inside sa_2's header
    items, skips = read(list_shards(tmp_path / "a.tar")[0])
    assert [i.id for i in items] == ["sa_1"] and skips == {"truncated_member": 1}


def test_folder_shards(tmp_path):
    for name in ("b.png", "a.jpg", "sub/c.JPEG", "skip.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    shards = list_shards(tmp_path, images_per_shard=2)
    assert [(s.name, s.members) for s in shards] == [
        ("files_00000", ("a.jpg", "b.png")),
        ("files_00001", ("sub/c.JPEG",)),
    ]
    assert [i.id for i in read(shards[1])[0]] == ["sub/c"]


def test_layout_detection(tmp_path):
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "sa_000001.tar", [])
    assert detect_layout(tmp_path / "tars") == "tar"
    for sub in ("images", "masks", "jsons"):
        (tmp_path / "authors" / sub).mkdir(parents=True)
    assert detect_layout(tmp_path / "authors") == "authors"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no images"):
        list_shards(tmp_path / "authors" / "images")
    with pytest.raises(ValueError, match="layout must be one of"):
        list_shards(tmp_path, layout="zip")


def test_authors_shards_and_missing_files(tmp_path):
    for sub in ("images", "masks", "jsons"):
        (tmp_path / sub).mkdir()
    for item in ("1", "2"):
        (tmp_path / "jsons" / f"{item}.json").write_text(json.dumps({"text": "t", "final_masks": []}))
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / f"{item}.png")
    Image.new("L", (4, 4)).save(tmp_path / "masks" / "1.png")
    (shard,) = list_shards(tmp_path, layout="authors")
    items, skips = read(shard)
    assert [i.id for i in items] == ["1"] and skips == {"missing_file": 1}


def test_id_lists(tmp_path):
    (tmp_path / "ids.txt").write_text("a\n\n b \n")
    (tmp_path / "ids.json").write_text('["c", "d"]')
    assert read_id_list(tmp_path / "ids.txt") == ["a", "b"]
    assert read_id_list(tmp_path / "ids.json") == ["c", "d"]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="strings only"):
        read_id_list(tmp_path / "bad.json")


def test_skip_log_keeps_a_few_examples():
    log = SkipLog(keep=2)
    for name in "abc":
        log.add("corrupt_image", name)
    other = SkipLog()
    other.add("corrupt_image", "d")
    log.merge(other)
    assert log.to_dict() == {"counts": {"corrupt_image": 4}, "examples": {"corrupt_image": ["a", "b"]}}
    assert SkipLog.from_dict(log.to_dict()).to_dict() == log.to_dict()


def test_open_image_turns_photos_upright_from_files_and_tars(tmp_path):
    """A phone photo stored sideways with an EXIF orientation is decoded upright (as every photo the
    project opens), whether it is a file or a member of a tar shard."""
    import io

    import numpy as np

    from mipadapter.data.sources import Item, open_image

    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buffer = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buffer, format="PNG", exif=exif.tobytes())
    (tmp_path / "p.png").write_bytes(buffer.getvalue())
    for item in (
        Item(id="a", shard="s", suffix=".png", data=buffer.getvalue()),
        Item(id="b", shard="s", suffix=".png", path=str(tmp_path / "p.png")),
    ):
        image = open_image(item)
        assert image.size == (40, 24) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(upright))
