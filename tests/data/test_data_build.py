"""The whole build on synthetic tar shards with deterministic fake stages: exact outputs, resume, ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fakes import COLOURS, DETECTOR_SCORES, SCENES, SLOTS, expected_scores, fake_backends, layout
from PIL import Image

from mipadapter.data import DataConfig, IncompleteRunError, build_dataset, merge_dataset
from mipadapter.manifest import read_manifest

CONFIG = DataConfig(top_k=4, batch_size=2)
RECORDED = ["sa_1", "sa_2", "sa_4", "sa_7", "sa_9", "sa_10"]  # in shard order
SHARD_OF = {
    "sa_1": "sa_000000",
    "sa_2": "sa_000000",
    "sa_4": "sa_000001",
    "sa_7": "sa_000002",
    "sa_9": "sa_000003",
    "sa_10": "sa_000003",
}


def kept_names(stem: str) -> list[str]:
    """The objects the filters keep: by descending detector score, at most 2."""
    return sorted(SCENES[stem], key=lambda n: -DETECTOR_SCORES[n])[:2]


def expected_ranking(key: str, descending: bool) -> list[tuple[str, float]]:
    scores = {stem: expected_scores(kept_names(stem))[1][key] for stem in RECORDED}
    order = sorted(scores, key=lambda s: ((-scores[s] if descending else scores[s]), s))
    return [(s, scores[s]) for s in order[: CONFIG.top_k]]


def build(sa1b: Path, output: Path, config: DataConfig = CONFIG, **kwargs):
    kwargs.setdefault("backends", fake_backends())
    kwargs.setdefault("rank", 0)
    kwargs.setdefault("world_size", 1)
    return build_dataset(sa1b, output, config, progress=False, **kwargs)


def tree(folder: Path, skip: tuple[str, ...] = ("run.json",)) -> dict[str, bytes]:
    """Every file under `folder` by relative path, except per-run timing files."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip and not p.name.endswith(".done.json")
    }


def test_build_writes_exactly_the_expected_manifest(sa1b, tmp_path):
    out = tmp_path / "out"
    report = build(sa1b, out)
    records = read_manifest(out / "manifest.jsonl")
    assert [r.id for r in records] == RECORDED
    for record in records:
        names = kept_names(record.id)
        per_object, scores = expected_scores(names)
        shard = SHARD_OF[record.id]
        assert record.image == f"images/{shard}/{record.id}.png"
        assert (record.width, record.height) == (64, 64)
        assert record.caption == "a photo of " + " and ".join(
            ("an " if n[0] in "aeiou" else "a ") + n for n in COLOURS if n in SCENES[record.id]
        )
        assert [o.name for o in record.objects] == names
        slots = layout(*SCENES[record.id])
        assert [o.box for o in record.objects] == [tuple(float(v) for v in slots[n]) for n in names]
        assert [o.score for o in record.objects] == [DETECTOR_SCORES[n] for n in names]
        assert [o.mask for o in record.objects] == [f"masks/{shard}/{record.id}.png"] * 2
        assert [o.mask_label for o in record.objects] == [1, 2]
        assert [o.clip_score for o in record.objects] == pytest.approx(per_object, abs=1e-6)
        assert record.scores == pytest.approx(scores, abs=1e-6)
        assert set(record.scores) == {"s_single", "s_pair", "s_quality"}
        # the label map holds each kept object's rectangle under its label, nothing else
        label_map = np.array(Image.open(out / record.objects[0].mask))
        expected = np.zeros((64, 64), np.uint8)
        for label, name in enumerate(names, start=1):
            x1, y1, x2, y2 = slots[name]
            expected[y1:y2, x1:x2] = label
        np.testing.assert_array_equal(label_map, expected)
        # images come out of the tar byte for byte
        assert Image.open(out / record.image).size == (64, 64)
    selection = json.loads((out / "selection.json").read_text())
    for name, key, descending in (
        ("s_quality", "s_quality", True),
        ("s_pair_high", "s_pair", True),
        ("s_pair_low", "s_pair", False),
    ):
        got = [(r["id"], r["score"]) for r in selection["rankings"][name]]
        want = expected_ranking(key, descending)
        assert [g[0] for g in got] == [w[0] for w in want], name
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-6)
    assert [r.id for r in read_manifest(out / "selected.jsonl")] == [
        s for s, _ in expected_ranking("s_quality", True)
    ]
    assert (
        report.records == 6 and report.selected == 4 and report.images_seen == 9
    )  # the cut member is never read
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_damaged_inputs_are_counted_skipped_and_reported(sa1b, tmp_path):
    out = tmp_path / "out"
    report = build(sa1b, out)
    expected = {"corrupt_image": 1, "truncated_member": 1, "json_without_objects": 1, "no_valid_objects": 1}
    assert dict(report.skips.counts) == expected
    stats = json.loads((out / "stats.json").read_text())
    assert stats["skipped"]["counts"] == expected
    assert stats["skipped"]["examples"]["corrupt_image"] == ["sa_000001/sa_5.png"]
    assert stats["skipped"]["examples"]["truncated_member"] == ["sa_000002/sa_8.png"]
    assert stats["skipped"]["examples"]["json_without_objects"] == ["sa_000001/sa_6.json"]
    assert stats["skipped"]["examples"]["no_valid_objects"] == ["sa_000000/sa_3"]
    text = report.text()
    for reason in expected:
        assert f"{reason}=1" in text
    assert "sa_000001/sa_5.png" in text


def test_kill_then_rerun_equals_an_uninterrupted_run(sa1b, tmp_path):
    straight = tmp_path / "straight"
    build(sa1b, straight, DataConfig(top_k=4, batch_size=1))
    resumed = tmp_path / "resumed"
    # captioned images in order: sa_1 sa_2 sa_3 sa_4 sa_7 sa_9 | sa_10 -> dies inside the last shard,
    # after sa_9's mask was written
    with pytest.raises(RuntimeError, match="injected failure"):
        build(sa1b, resumed, DataConfig(top_k=4, batch_size=1), backends=fake_backends(fail_after=6))
    assert (resumed / "masks/sa_000003/sa_9.png").exists()
    assert not (resumed / "shards/sa_000003.done.json").exists()
    assert not (resumed / "manifest.jsonl").exists()
    backends = fake_backends()
    report = build(sa1b, resumed, DataConfig(top_k=4, batch_size=1), backends=backends)
    assert backends.captioner.seen == 2  # only the unfinished shard was redone (sa_9, sa_10)
    assert report.shards_processed == 1 and report.shards_already_done == 3 and report.images_now == 2
    assert tree(resumed) == tree(straight)  # no lost, no duplicated record, identical files
    ids = [r.id for r in read_manifest(resumed / "manifest.jsonl")]
    assert ids == RECORDED


def test_a_rerun_of_a_finished_build_changes_nothing(sa1b, tmp_path):
    out = tmp_path / "out"
    build(sa1b, out)
    before = tree(out)
    backends = fake_backends()
    build(sa1b, out, backends=backends)
    assert backends.captioner.seen == 0
    assert tree(out) == before


def test_two_ranks_give_the_same_set_as_one(sa1b, tmp_path):
    single = tmp_path / "single"
    build(sa1b, single)
    sharded = tmp_path / "sharded"
    build(sa1b, sharded, rank=1, world_size=2, merge=False)
    with pytest.raises(IncompleteRunError, match="2 of 4 shards are not finished"):
        merge_dataset(sharded)
    done = sorted(p.name for p in (sharded / "shards").glob("*.done.json"))
    assert done == ["sa_000001.done.json", "sa_000003.done.json"]  # rank 1 owns shards 1::2
    build(sa1b, sharded, rank=0, world_size=2)
    assert tree(sharded) == tree(single)


def test_merge_again_with_another_top_k(sa1b, tmp_path):
    out = tmp_path / "out"
    build(sa1b, out)
    report = merge_dataset(out, top_k=2)
    assert report.selected == 2
    assert [r.id for r in read_manifest(out / "selected.jsonl")] == [
        s for s, _ in expected_ranking("s_quality", True)
    ][:2]


def test_restart_with_other_settings_is_refused(sa1b, tmp_path):
    out = tmp_path / "out"
    build(sa1b, out)
    with pytest.raises(ValueError, match=r"other settings \(mode: .multi. → .single.\)"):
        build(sa1b, out, DataConfig(mode="single"))
    build(sa1b, out, DataConfig(top_k=1, batch_size=3))  # selection-only and speed settings may change


def test_single_subject_mode_drops_s_pair(sa1b, tmp_path):
    out = tmp_path / "out"
    config = DataConfig(top_k=10, mode="single", filters=DataConfig().filters)
    report = build(sa1b, out, config)
    records = {r.id: r for r in read_manifest(out / "manifest.jsonl")}
    assert "sa_3" in records  # one object is enough without a pair
    assert "no_valid_objects" not in report.skips.counts
    for record in records.values():
        assert set(record.scores) == {"s_single", "s_quality"}
        _, scores = expected_scores(kept_names(record.id), mode="single")
        assert record.scores == pytest.approx(scores, abs=1e-6)
    selection = json.loads((out / "selection.json").read_text())
    assert set(selection["rankings"]) == {"s_quality"}


def test_folder_input(tmp_path):
    from data_fakes import draw

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    draw(layout("apple", "frog")).save(folder / "a.png")
    draw(layout("car", "banana")).save(folder / "sub" / "b.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out"
    report = build(folder, out, DataConfig(images_per_shard=2))
    records = read_manifest(out / "manifest.jsonl")
    assert [r.id for r in records] == ["a", "sub/b"]
    assert records[0].image == "../photos/a.png"  # relative to the manifest folder; not copied
    assert (out / records[1].objects[0].mask).exists()
    assert report.skips.counts == {"corrupt_image": 1}


def test_slots_fit_the_default_filters():
    """Guards the fixture: every synthetic object passes the authors' size and aspect rules."""
    for x1, y1, x2, y2 in SLOTS:
        area = (x2 - x1) * (y2 - y1) / 64**2
        assert 0.08 < area < 0.7 and 0.3 < (x2 - x1) / (y2 - y1) < 3


def test_folder_input_skips_oversized_and_vanished_images(tmp_path, monkeypatch):
    from data_fakes import draw

    from mipadapter.data import sources
    from mipadapter.testing.images import png_bomb

    folder = tmp_path / "photos"
    folder.mkdir()
    draw(layout("apple", "frog")).save(folder / "a.png")
    (folder / "bomb.png").write_bytes(png_bomb(12000, 12000))  # 144 MP behind 140 KB
    draw(layout("car", "banana")).save(folder / "gone.png")
    listed = sources.list_shards

    def list_then_delete(*args, **kwargs):  # the photo vanishes between listing and reading
        shards = listed(*args, **kwargs)
        (folder / "gone.png").unlink()
        return shards

    monkeypatch.setattr(sources, "list_shards", list_then_delete)
    report = build(folder, tmp_path / "out", DataConfig(images_per_shard=3))
    assert [r.id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == ["a"]
    assert report.skips.counts == {"too_many_pixels": 1, "missing_image": 1}
    assert report.skips.examples["too_many_pixels"] == ["files_00000/bomb.png"]


def test_a_bomb_member_of_a_tar_shard_is_skipped(tmp_path):
    import io
    import tarfile

    from data_fakes import draw

    from mipadapter.testing.images import png_bomb

    good = io.BytesIO()
    draw(layout("apple", "frog")).save(good, format="PNG")
    meta = json.dumps({"image": {}, "annotations": [{"id": 1}]}).encode()
    members = {"sa_1.png": good.getvalue(), "sa_1.json": meta}
    members |= {"sa_2.png": png_bomb(12000, 12000), "sa_2.json": meta}
    shard = tmp_path / "shards" / "sa_000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    report = build(shard.parent, tmp_path / "out")
    assert [r.id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == ["sa_1"]
    assert report.skips.counts == {"too_many_pixels": 1}
