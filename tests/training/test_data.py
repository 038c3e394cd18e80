"""Reading, filtering and batching the synthetic data sets in both layouts."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import HEIGHT, LAYOUTS, WIDTH, write_authors_layout, write_manifest_layout

from mipadapter.testing import build_clip_tokenizer
from mipadapter.training.batching import Collator, EmptyBatch, ResumableBatchSampler, SubjectDataset
from mipadapter.training.config import FilterConfig
from mipadapter.training.samples import CLIP_MEAN, CLIP_STD, SampleSettings, SkippedSample, build_sample
from mipadapter.training.sources import (
    BAD_FIELD,
    CORRUPT_JSON,
    EMPTY_MASK,
    MISSING_IMAGE,
    MISSING_MASK,
    NO_VALID_OBJECT,
    NoValidDataError,
    SubjectRules,
    authors_candidates,
    build_index,
    manifest_candidates,
    read_ids,
)

RULES = SubjectRules(FilterConfig().object_filter(), 0.0, 1, 3)
SETTINGS = SampleSettings(resolution=64, reference_size=32, drop_text=0.0, drop_image=0.0, drop_both=0.0)


def names_of(records):
    return [[o.name for o in r.objects] for r in records]


def expected_names(count):
    return [[s.name for s in LAYOUTS[k % len(LAYOUTS)]] for k in range(count)]


def test_authors_layout_is_read_and_filtered(authors_data):
    records, report = build_index(*authors_candidates(authors_data, None), RULES)
    assert report.total == report.kept == 6 and not report.skipped
    assert sorted(names_of(records)) == sorted(expected_names(6))
    for record in records:  # the label of each object is its shape's label in the map
        assert all(o.mask_label is not None for o in record.objects)
        assert record.original_size == (WIDTH * 4, HEIGHT * 4)


@pytest.mark.parametrize("binary", [True, False])
def test_manifest_layout_is_read_and_filtered(tmp_path, binary):
    path = write_manifest_layout(tmp_path / "m", 6, binary_masks=binary)
    records, report = build_index(*manifest_candidates(path), RULES)
    assert report.kept == 6
    assert names_of(records) == expected_names(6)
    assert all((o.mask_label is None) == binary for r in records for o in r.objects)


def test_both_layouts_give_the_same_samples(tmp_path):
    write_authors_layout(tmp_path / "a", 3)
    path = write_manifest_layout(tmp_path / "m", 3)
    authors, _ = build_index(*authors_candidates(tmp_path / "a", None), RULES)
    manifest, _ = build_index(*manifest_candidates(path), RULES)
    for a, m in zip(authors, manifest, strict=True):
        sa = build_sample(a, 0, random.Random(1), SETTINGS)
        sm = build_sample(m, 0, random.Random(1), SETTINGS)
        assert torch.equal(sa.pixel_values, sm.pixel_values)
        assert torch.equal(sa.references, sm.references)


def test_filters_and_subject_cap(authors_data):
    rules = SubjectRules(FilterConfig().object_filter(), 0.0, 2, 2)  # 2 subjects exactly
    records, report = build_index(*authors_candidates(authors_data, None), rules)
    assert names_of(records) == [["cat", "dog"], ["cup", "box"], ["cat", "dog"], ["cup", "box"]]
    assert report.skipped == {NO_VALID_OBJECT: 2}  # the one-object images
    assert report.objects_rejected["over_max_subjects"] == 2
    strict = SubjectRules(FilterConfig(min_score=0.85).object_filter(), 0.0, 1, 3)
    records, report = build_index(*authors_candidates(authors_data, None), strict)
    assert all(len(r.objects) == 1 for r in records) and report.objects_rejected["low_score"] == 6


def test_sample_crop_references_and_micro_conditioning(authors_data):
    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    record = records[0]  # cat (red rectangle) and dog (green ellipse)
    settings = SampleSettings(
        resolution=64, reference_size=32, flip_prob=0.0, drop_text=0, drop_image=0, drop_both=0
    )
    sample = build_sample(record, 0, random.Random(0), settings)
    assert sample.pixel_values.shape == (3, 64, 64) and sample.references.shape == (2, 3, 32, 32)
    assert sample.names == ["cat", "dog"] and sample.caption == record.caption
    original_h, original_w, top, left, target_h, target_w = sample.time_ids
    assert (original_h, original_w, target_h, target_w) == (HEIGHT * 4, WIDTH * 4, 64, 64)
    assert top == 0 and 6 <= left <= 8  # the 64-px square of an 80x64 image holding x 8..70
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = sample.references * std + mean  # back to [0, 1]
    dog = pixels[1]
    assert torch.allclose(dog[:, 0, 0], torch.ones(3), atol=0.02)  # ellipse corner: white, not background
    assert dog[1, 16, 16] > 0.7 and dog[0, 16, 16] < 0.25  # centre: the green ellipse
    assert torch.allclose(pixels[0, :, 16, 16], torch.tensor([220, 30, 30]) / 255, atol=0.02)


def test_flip_is_random_and_deterministic_per_seed(authors_data):
    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    settings = SampleSettings(resolution=64, reference_size=32, flip_prob=0.5)
    draws = [build_sample(records[0], 0, random.Random(seed), settings).references for seed in range(8)]
    again = [build_sample(records[0], 0, random.Random(seed), settings).references for seed in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(draws, again, strict=True))
    flipped = {bool(torch.equal(d[0], draws[0][0])) for d in draws}
    assert flipped == {True, False}


def test_collate_pads_variable_subject_counts(authors_data):
    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    dataset = SubjectDataset(records, SETTINGS)
    tokenizers = [build_clip_tokenizer(), build_clip_tokenizer("!")]
    batch = Collator(tokenizers, 32)([dataset[(i, i)] for i in range(3)])  # 2, 1 and 3 subjects
    assert batch.size == 3
    assert batch.subject_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert batch.references.shape == (3, 3, 3, 32, 32)
    b, n, m = batch.name_mask.shape
    assert (b, n) == (3, 3) and batch.name_mask.any(dim=-1).all()  # padded names keep one row
    assert all(ids.shape[0] == 9 for ids in batch.name_ids)
    assert all(ids.shape == (3, 77) for ids in batch.prompt_ids)
    assert batch.time_ids.shape == (3, 6) and batch.drop_image.tolist() == [False] * 3


def test_sampler_is_resumable_and_shards_processes():
    full = ResumableBatchSampler(10, 2, seed=3)
    stream = iter(full)
    first = [next(stream) for _ in range(12)]  # over two epochs (5 batches each)
    resumed = iter(ResumableBatchSampler(10, 2, seed=3, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:12]
    seen = [i for batch in first[:5] for i, _ in batch]
    assert sorted(seen) == list(range(10))  # an epoch visits each record once
    ranks = [iter(ResumableBatchSampler(10, 2, seed=3, rank=k, world_size=2)) for k in range(2)]
    batch0, batch1 = next(ranks[0]), next(ranks[1])
    assert batch0 + batch1 == first[0] + first[1]  # global batch 0 split between the processes
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(3, 2, seed=0, world_size=2)


def test_bad_data_is_skipped_and_counted(tmp_path):
    root = tmp_path / "bad"
    write_authors_layout(root, 6)
    (root / "images" / "sa_0.png").unlink()  # missing image
    (root / "jsons" / "sa_1.json").write_text("{not json")  # corrupt JSON
    Image.fromarray(np.zeros((HEIGHT, WIDTH), np.uint8)).save(root / "masks" / "sa_2.png")  # empty mask
    data = json.loads((root / "jsons" / "sa_3.json").read_text())
    data["text"] = "an empty street"  # no object named in the caption
    (root / "jsons" / "sa_3.json").write_text(json.dumps(data))
    records, report = build_index(*authors_candidates(root, None), RULES)
    assert [r.id for r in records] == ["sa_4", "sa_5"]
    assert report.skipped == {MISSING_IMAGE: 1, CORRUPT_JSON: 1, EMPTY_MASK: 1, NO_VALID_OBJECT: 1}
    assert report.total == 6 and report.kept == 2


def test_bad_manifest_lines_are_skipped_and_counted(tmp_path):
    path = write_manifest_layout(tmp_path / "m", 4)
    lines = path.read_text().splitlines()
    lines[0] = lines[0][:40]  # a truncated line
    lines[1] = lines[1].replace('"caption"', '"captoin"')  # schema error
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "m" / "masks" / "img_2_0.png").unlink()
    records, report = build_index(*manifest_candidates(path), RULES)
    assert [r.id for r in records] == ["img_3"]
    assert report.skipped == {CORRUPT_JSON: 1, BAD_FIELD: 1, MISSING_MASK: 1}


def test_nothing_valid_is_a_clear_error(tmp_path):
    root = tmp_path / "none"
    write_authors_layout(root, 2)
    for path in (root / "jsons").iterdir():
        path.write_text("[")
    with pytest.raises(NoValidDataError, match=r"0 of 2 images usable; skipped: corrupt_json 2"):
        build_index(*authors_candidates(root, None), RULES)


def test_broken_sample_at_load_time_is_skipped_in_the_batch(authors_data):
    records, _ = build_index(*authors_candidates(authors_data, None), RULES)
    dataset = SubjectDataset(records, SETTINGS)
    Path = type(authors_data)
    Path(records[0].image).write_bytes(b"not a png")  # breaks after indexing
    items = [dataset[(0, 0)], dataset[(1, 1)]]
    assert isinstance(items[0], SkippedSample) and items[0].reason == "unreadable_image"
    batch = Collator([build_clip_tokenizer()], 32)(items)
    assert batch.size == 1 and batch.skipped == {"unreadable_image": 1}
    empty = Collator([build_clip_tokenizer()], 32)(items[:1])
    assert isinstance(empty, EmptyBatch) and empty.size == 0


def test_id_lists(tmp_path):
    (tmp_path / "ids.txt").write_text("a\nb\n\n")
    (tmp_path / "ids.json").write_text('["a", "b"]')
    (tmp_path / "ids.pkl").write_bytes(pickle.dumps(["a", "b"]))
    assert (
        read_ids(tmp_path / "ids.txt")
        == read_ids(tmp_path / "ids.json")
        == read_ids(tmp_path / "ids.pkl")
        == ["a", "b"]
    )

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
        read_ids(tmp_path / "evil.pkl")


def test_authors_ids_file_selects_images(authors_data, tmp_path):
    (tmp_path / "ids.json").write_text('["sa_1", "sa_4"]')
    records, report = build_index(*authors_candidates(authors_data, str(tmp_path / "ids.json")), RULES)
    assert [r.id for r in records] == ["sa_1", "sa_4"] and report.total == 2


def test_condition_dropout_frequencies_follow_each_rate(tmp_path):
    """Guards the three dropout branches against mixed-up rates: under unequal rates (image 0.3, text 0.1,
    both 0.05) each outcome's frequency over 2,000 draws lies within 4.5 binomial standard deviations of
    its rate, and "drop both" empties the caption *and* drops the image. Fails when the first branch
    uses the text rate, or when the "drop both" branch keeps the image (or the caption)."""
    write_authors_layout(tmp_path, 2)
    records, _ = build_index(*authors_candidates(tmp_path, None), RULES)
    record = min(records, key=lambda r: len(r.objects))
    settings = SampleSettings(16, 8, drop_image=0.3, drop_text=0.1, drop_both=0.05)
    draws = 2000
    counts = {"image": 0, "text": 0, "both": 0, "none": 0}
    for seed in range(draws):
        sample = build_sample(record, 0, random.Random(seed), settings)
        text_dropped = sample.caption == ""
        assert text_dropped or sample.caption == record.caption
        key = {(True, False): "image", (False, True): "text", (True, True): "both"}.get(
            (sample.drop_image, text_dropped), "none"
        )
        counts[key] += 1
    rates = {"image": 0.3, "text": 0.1, "both": 0.05, "none": 0.55}
    for key, rate in rates.items():
        tolerance = 4.5 * (rate * (1 - rate) / draws) ** 0.5
        assert abs(counts[key] / draws - rate) < tolerance, (key, counts)
    only_both = SampleSettings(16, 8, drop_image=0, drop_text=0, drop_both=1.0)
    for seed in range(20):
        sample = build_sample(record, 0, random.Random(seed), only_both)
        assert sample.caption == "" and sample.drop_image


def _labels_and_record(root):
    """An indexed authors-layout image (two subjects in one label map), its mask path and label map."""
    write_authors_layout(root, 1)
    records, _ = build_index(*authors_candidates(root, None), RULES)
    record = records[0]
    mask_path = type(root)(record.objects[0].mask)  # absolute in the authors' layout
    return record, mask_path, np.array(Image.open(mask_path))


def test_each_reference_is_cut_by_its_own_label_of_a_shared_label_map(tmp_path):
    """Guards the label a subject's mask is read with: the other subject's label painted over the
    background inside the first subject's box leaves its reference unchanged (those pixels are not its
    own). Fails when every non-zero label counts as the subject (``mask_label`` dropped)."""
    record, mask_path, labels = _labels_and_record(tmp_path)
    first, second = record.objects[:2]
    settings = SampleSettings(64, 32, flip_prob=0.0, random_crop=False, drop_text=0, drop_image=0, drop_both=0)
    before = build_sample(record, 0, random.Random(0), settings).references[0]
    x1, y1, x2, y2 = (int(v) for v in first.box)
    inside = labels[y1:y2, x1:x2]
    assert (inside == 0).any()  # background inside the box, to paint
    inside[inside == 0] = second.mask_label
    Image.fromarray(labels).save(mask_path)
    after = build_sample(record, 0, random.Random(0), settings).references[0]
    assert torch.equal(before, after)


def test_an_emptied_mask_is_skipped_as_empty_with_a_line_naming_the_image_and_subject(tmp_path):
    """Guards the empty-mask refusal at sample time (the mask changed after indexing): its reason is
    ``EMPTY_MASK`` and its message names the image and the subject, word for word."""
    from mipadapter.training.samples import safe_build_sample

    record, mask_path, labels = _labels_and_record(tmp_path)
    labels[labels == record.objects[0].mask_label] = 0
    Image.fromarray(labels).save(mask_path)
    skipped = safe_build_sample(record, 4, 1, SETTINGS)
    assert skipped == SkippedSample(4, EMPTY_MASK, f"{record.id}: the mask of {record.objects[0].name!r} is empty")


class _Fixed(random.Random):
    """A generator whose ``random()`` always returns ``value`` (integers still come from the seed)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("draw", "outcome"), [(0.25, (False, "")), (0.5, (True, "")), (0.75, (False, None)), (0.2, (True, None))]
)
def test_condition_dropout_draws_at_each_boundary_fall_in_the_next_branch(tmp_path, draw, outcome):
    """Guards the dropout branches' strict comparisons: with rates image 0.25, text 0.25 and both 0.25,
    a draw of exactly 0.25 drops the text only, exactly 0.5 drops both, exactly 0.75 drops nothing, and
    0.2 the image only (None: the caption is kept). Fails on ``<=`` in any of the three branches."""
    write_authors_layout(tmp_path, 1)
    records, _ = build_index(*authors_candidates(tmp_path, None), RULES)
    settings = SampleSettings(16, 8, flip_prob=0.0, drop_image=0.25, drop_text=0.25, drop_both=0.25)
    sample = build_sample(records[0], 0, _Fixed(draw), settings)
    drop_image, caption = outcome
    assert (sample.drop_image, sample.caption) == (drop_image, records[0].caption if caption is None else caption)


def _tall_record(**fields):
    from mipadapter.manifest import ImageRecord, ObjectRecord

    objects = (ObjectRecord("cat", (10.0, 5.0, 20.0, 15.0), 0.9),)
    return ImageRecord("tall", "tall.png", fields.pop("width"), fields.pop("height"), "a cat", objects, **fields)


def test_the_authors_centre_square_and_its_offsets_on_an_odd_sized_image():
    """Guards crop_and_subjects' arithmetic where no square holds the authors' crop region, on a 41×101
    image at resolution 32: the centre square (left 0, top 30), the authors' offset
    ((H − R) // 2, (W − R) // 2) = (34, 4) in integers, and with ``crop_coords="resized"`` the crop's
    corner in the frame resized to R: (round(30·32/41), 0) = (23, 0)."""
    from mipadapter.training.samples import crop_and_subjects

    record = _tall_record(width=41, height=101, crop_region=(0.0, 0.0, 41.0, 101.0))
    settings = SampleSettings(32, 16, crop="authors")
    left, top, offset, subjects = crop_and_subjects(record, 41, 101, random.Random(0), settings)
    assert (left, top, offset) == (0, 30, (34, 4)) and all(type(v) is int for v in offset)
    assert [s.name for s in subjects] == ["cat"]
    resized = SampleSettings(32, 16, crop="authors", crop_coords="resized")
    assert crop_and_subjects(record, 41, 101, random.Random(0), resized)[2] == (23, 0)


def test_a_random_subject_crop_moves_with_the_seed_and_a_fixed_one_is_centred():
    """Guards that ``random_crop`` reaches the subject crop: on a 100×40 image whose subject box allows
    lefts 0 to 10, twenty seeds give several lefts, all in range; without it the left is the middle, 5."""
    from mipadapter.training.samples import crop_and_subjects

    record = _tall_record(width=100, height=40)
    moving = SampleSettings(32, 16, crop="subjects", random_crop=True)
    lefts = {crop_and_subjects(record, 100, 40, random.Random(seed), moving)[0] for seed in range(20)}
    assert len(lefts) > 1 and lefts <= set(range(11))
    fixed = SampleSettings(32, 16, crop="subjects", random_crop=False)
    assert crop_and_subjects(record, 100, 40, random.Random(0), fixed)[:2] == (5, 0)
