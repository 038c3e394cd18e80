"""`score` on a set in the authors' layout: their JSONs and label maps read, filtered and scored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fakes import DETECTOR_SCORES, draw, expected_scores, fake_backends, layout
from PIL import Image

from mipadapter.data import Backends, DataConfig, score_dataset
from mipadapter.data.sources import read_id_list
from mipadapter.manifest import read_manifest


def write_authors_item(
    root: Path, item_id: str, names: tuple[str, ...], *, with_value: bool = True, label_offset: int = 0
) -> None:
    """images/<id>.png, masks/<id>.png (label map), jsons/<id>.json as the authors ship them."""
    slots = layout(*names)
    draw(slots).save(root / "images" / f"{item_id}.png")
    label_map = np.zeros((64, 64), np.uint8)
    entries = [{"value": 0, "label": "background"}]
    for index, name in enumerate(names, start=1):
        x1, y1, x2, y2 = slots[name]
        label_map[y1:y2, x1:x2] = index + label_offset
        entry = {"label": name, "logit": DETECTOR_SCORES[name], "box": [x1, y1, x2, y2]}
        if with_value:
            entry["value"] = index + label_offset
        entries.append(entry)
    Image.fromarray(label_map, mode="L").save(root / "masks" / f"{item_id}.png")
    meta = {
        "original_size": [128, 128],
        "text": "a photo of " + " and ".join(f"a {n}" for n in names),
        "final_masks": entries,
    }
    (root / "jsons" / f"{item_id}.json").write_text(json.dumps(meta))


@pytest.fixture
def authors(tmp_path: Path) -> Path:
    root = tmp_path / "subject_dataset"
    for sub in ("images", "masks", "jsons"):
        (root / sub).mkdir(parents=True)
    write_authors_item(root, "00001", ("apple", "frog"))
    write_authors_item(
        root, "00002", ("car", "banana"), with_value=False, label_offset=4
    )  # labels found in the box
    write_authors_item(root, "00003", ("frog", "car", "apple"))
    (root / "jsons" / "00004.json").write_text(
        json.dumps({"text": "nothing", "final_masks": [{"value": 0, "label": "background"}]})
    )
    draw({}).save(root / "images" / "00004.png")
    draw({}).save(root / "masks" / "00004.png")
    write_authors_item(root, "00005", ("apple", "car"))
    (root / "masks" / "00005.png").unlink()
    (root / "jsons" / "00006.json").write_text("{broken")
    draw({}).save(root / "images" / "00006.png")
    draw({}).save(root / "masks" / "00006.png")
    return root


def test_score_the_authors_layout(authors, tmp_path):
    out = tmp_path / "scored"
    only_clip = Backends(embedder=fake_backends().embedder)  # scoring needs no other stage
    report = score_dataset(
        authors,
        out,
        DataConfig(top_k=2, images_per_shard=2),
        backends=only_clip,
        rank=0,
        world_size=1,
        progress=False,
    )
    records = read_manifest(out / "manifest.jsonl")
    assert [r.id for r in records] == ["00001", "00002", "00003"]
    for record, names in zip(records, [["apple", "frog"], ["car", "banana"], ["apple", "frog"]], strict=True):
        assert [o.name for o in record.objects] == names
        per_object, scores = expected_scores(names)
        assert record.scores == pytest.approx(scores, abs=1e-6)
        assert [o.clip_score for o in record.objects] == pytest.approx(per_object, abs=1e-6)
        assert record.image == f"../subject_dataset/images/{record.id}.png"
        assert all(o.mask == f"../subject_dataset/masks/{record.id}.png" for o in record.objects)
        assert record.original_size == (128, 128) and (record.width, record.height) == (64, 64)
    assert [o.mask_label for o in records[0].objects] == [1, 2]  # from "value"
    assert [o.mask_label for o in records[1].objects] == [5, 6]  # no "value": the box's dominant label
    assert report.skips.counts == {"json_without_objects": 1, "missing_file": 1, "corrupt_json": 1}
    # nothing copied: the manifest points into the input
    assert not (out / "images").exists() and not (out / "masks").exists()
    selection = json.loads((out / "selection.json").read_text())
    ranked = [r["id"] for r in selection["rankings"]["s_quality"]]
    quality = {r.id: r.scores["s_quality"] for r in records}
    assert ranked == sorted(quality, key=lambda i: -quality[i])[:2]


def test_score_a_selected_subset(authors, tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("00003\n00001\n")
    out = tmp_path / "scored"
    score_dataset(
        authors,
        out,
        DataConfig(),
        ids=read_id_list(ids),
        backends=fake_backends(),
        rank=0,
        world_size=1,
        progress=False,
    )
    assert [r.id for r in read_manifest(out / "manifest.jsonl")] == ["00003", "00001"]


def test_score_refuses_other_layouts(authors, tmp_path):
    with pytest.raises(ValueError, match="authors' layout"):
        score_dataset(authors, tmp_path / "o", layout="tar", backends=fake_backends(), rank=0, world_size=1)


def test_score_with_a_real_tiny_clip_through_the_cli(authors, tmp_path):
    """`mipadapter data score` end to end: the CLIP weights load from a local folder, nothing is faked."""
    from mipadapter.cli.main import main
    from mipadapter.testing.tiny_data_models import tiny_clip

    clip = tiny_clip()
    clip.model.save_pretrained(tmp_path / "clip")
    clip.processor.save_pretrained(tmp_path / "clip")
    config = tmp_path / "data.yaml"
    config.write_text(f"clip_model: {tmp_path / 'clip'}\nclip_batch_size: 2\nfilters:\n  max_objects: 3\n")
    out = tmp_path / "scored"
    code = main(
        [
            "data",
            "score",
            "--input",
            str(authors),
            "--output",
            str(out),
            "--config",
            str(config),
            "--top-k",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    records = read_manifest(out / "manifest.jsonl")
    assert [r.id for r in records] == ["00001", "00002", "00003"]
    assert len(records[2].objects) == 3
    assert all(set(r.scores) == {"s_single", "s_pair", "s_quality"} for r in records)
    assert len(json.loads((out / "selection.json").read_text())["rankings"]["s_quality"]) == 1


def test_bad_authors_items_are_skipped_with_their_reasons(tmp_path):
    """Each kind of broken item is counted under its own reason; the good ones are still scored."""
    from mipadapter.testing.images import png_bomb

    root = tmp_path / "subject_dataset"
    for sub in ("images", "masks", "jsons"):
        (root / sub).mkdir(parents=True)
    for number in range(1, 12):
        write_authors_item(root, f"{number:05d}", ("apple", "frog"))

    def edit(item_id, change):
        path = root / "jsons" / f"{item_id}.json"
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))

    edit("00001", lambda m: m.update(original_size=["a", "b"]))
    edit("00002", lambda m: m["final_masks"][1].update(logit="high"))
    edit("00003", lambda m: m["final_masks"][1].update(box=[1, 2, 3]))
    edit("00004", lambda m: m["final_masks"][1].update(box=[0, 0, 5000, 5000]))
    (root / "masks" / "00005.png").write_bytes(png_bomb(12000, 12000))
    (root / "images" / "00006.png").write_bytes(png_bomb(12000, 12000))
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "00007.png")
    (root / "masks" / "00008.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "images" / "00009.png").write_bytes(b"not an image")
    out = tmp_path / "scored"
    report = score_dataset(
        root, out, DataConfig(), backends=Backends(embedder=fake_backends().embedder), rank=0, world_size=1,
        progress=False,
    )  # fmt: skip
    assert [r.id for r in read_manifest(out / "manifest.jsonl")] == ["00010", "00011"]
    assert report.skips.counts == {
        "bad_field": 3, "box_outside_image": 1, "too_many_pixels": 2, "mask_size_mismatch": 1,
        "corrupt_mask": 1, "corrupt_image": 1,
    }  # fmt: skip
    examples = report.skips.examples["too_many_pixels"]
    assert examples == ["authors_00000/00006.png", "authors_00000/00005 (mask)"]


def test_a_mask_bomb_is_refused_from_its_header(tmp_path):
    import tracemalloc

    from mipadapter.data.masks import read_label_map
    from mipadapter.limits import PixelLimitError
    from mipadapter.testing.images import png_bomb

    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(12000, 12000))
    tracemalloc.start()
    try:
        with pytest.raises(PixelLimitError, match=r"is 12000×12000 \(144.0 MP\), above the 50 MP limit"):
            read_label_map(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # decoded and cast to int64 as before: 1.15 GB
    label_map = np.zeros((40, 50), np.uint16)
    label_map[5:9, 5:9] = 300
    Image.fromarray(label_map).save(tmp_path / "wide.png")
    read = read_label_map(str(tmp_path / "wide.png"))
    assert read.dtype == np.uint16 and int(read.max()) == 300  # the file's own type, not int64
