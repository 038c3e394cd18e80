"""Metrics as pure functions over features, and the aggregation over seeds and subjects."""

from __future__ import annotations

import math

import numpy as np
import pytest
from eval_fakes import ASSETS
from PIL import Image

from mipadapter.eval import metrics
from mipadapter.eval.aggregate import aggregate, mean_std, per_image_values


def test_cosine_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    got = metrics.cosine_matrix(a, b)
    for i in range(3):
        for j in range(4):
            assert got[i, j] == pytest.approx(a[i] @ b[j] / np.linalg.norm(a[i]) / np.linalg.norm(b[j]))


def test_metric_errors_name_the_bad_input():
    with pytest.raises(ValueError, match=r"feature widths differ: a \(1, 3\), b \(1, 4\)"):
        metrics.cosine_matrix(np.ones((1, 3)), np.ones((1, 4)))
    with pytest.raises(ValueError, match=r"zero feature vector at rows \[1\]"):
        metrics.cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="must be \\[n, e\\], got shape \\(3,\\)"):
        metrics.paired_cosine(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="unknown CLIP-T convention 'x2'"):
        metrics.clip_t_convention([0.3], "x2")


def test_clip_t_scaling_and_clipping():
    cosines = np.array([0.3, -0.2, 0.0, 0.4])
    np.testing.assert_allclose(metrics.clip_t_convention(cosines, "raw"), cosines)
    np.testing.assert_allclose(metrics.clip_t_convention(cosines, "concept101"), [0.75, 0.0, 0.0, 1.0])
    image = np.array([[1.0, 0.0], [1.0, 0.0]])
    text = np.array([[math.cos(0.5), math.sin(0.5)], [-1.0, 0.2]])
    np.testing.assert_allclose(metrics.clip_t(image, text, "concept101"), [2.5 * math.cos(0.5), 0.0])


def test_image_alignment_is_the_mean_over_references():
    generated = np.array([[1.0, 0.0], [0.0, 2.0]])
    references = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(
        metrics.image_alignment(generated, references), [(1 + s + 0) / 3, (0 + s + 1) / 3]
    )


def test_clip_i_and_dino_of_an_image_with_itself_is_one(tiny_encoders):
    with Image.open(ASSETS / "cat" / "00.jpg") as opened:
        photo = opened.convert("RGB")
    for encoder in (tiny_encoders.clip, tiny_encoders.dino):
        features = encoder.image_features([photo])
        assert metrics.image_alignment(features, features)[0] == pytest.approx(1.0, abs=1e-6)
        other = encoder.image_features([photo.transpose(Image.Transpose.ROTATE_90)])
        assert metrics.image_alignment(features, other)[0] < 1 - 1e-4


def _record(seed, clip_t, clip_i, dino, subjects=("a", "b")):
    return {
        "seed": seed,
        "subjects": list(subjects),
        "clip_t": clip_t,
        "clip_i": dict(zip(subjects, clip_i, strict=True)),
        "dino": dict(zip(subjects, dino, strict=True)),
        "file": f"s{seed}",
    }


def test_aggregate_matches_a_hand_computation():
    records = [
        _record(1, 0.7, (0.6, 0.8), (0.4, 0.2)),
        _record(1, 0.5, (0.4, 0.4), (0.3, 0.5)),
        _record(2, 0.9, (1.0, 0.2), (0.1, 0.1)),
    ]
    result = aggregate(records)
    # seed 1: clip_t (0.7 + 0.5)/2 = 0.6; seed 2: 0.9 → mean 0.75, std |0.9-0.6|/√2
    assert result["clip_t"]["per_seed"] == pytest.approx({"1": 0.6, "2": 0.9})
    assert result["clip_t"]["mean"] == pytest.approx(0.75)
    assert result["clip_t"]["std"] == pytest.approx(0.3 / math.sqrt(2))
    # clip_i per image: means 0.7, 0.4 | 0.6 → seeds 0.55, 0.6; minima 0.6, 0.4 | 0.2 → seeds 0.5, 0.2
    assert result["clip_i"]["mean"] == pytest.approx(0.575)
    assert result["clip_i_min"]["mean"] == pytest.approx(0.35)
    assert result["clip_i_min"]["std"] == pytest.approx(0.3 / math.sqrt(2))
    # dino per image: means 0.3, 0.4 | 0.1; minima 0.2, 0.3 | 0.1
    assert result["dino"]["per_seed"] == pytest.approx({"1": 0.35, "2": 0.1})
    assert result["dino_min"]["per_seed"] == pytest.approx({"1": 0.25, "2": 0.1})
    # by subject over all images: a = (0.6+0.4+1.0)/3, b = (0.8+0.4+0.2)/3
    assert result["by_subject"]["clip_i"] == pytest.approx({"a": 2.0 / 3, "b": 1.4 / 3})
    assert result["worst_subject"]["clip_i"]["subject"] == "b"
    assert result["n_images"] == 3 and result["seeds"] == [1, 2]


def test_one_seed_has_no_std_and_errors_are_named():
    assert mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError, match="at least one value"):
        mean_std([])
    with pytest.raises(ValueError, match="no image records"):
        aggregate([])
    bad = _record(1, 0.5, (0.1, 0.2), (0.1, 0.2))
    del bad["clip_i"]["b"]
    with pytest.raises(ValueError, match=r"no clip_i score for subjects \['b'\]"):
        per_image_values(bad, "clip_i")
    with pytest.raises(ValueError, match="unknown metric 'lpips'"):
        per_image_values(bad, "lpips")


def test_a_missing_subject_lowers_the_minimum_while_the_mean_stays_high():
    """Constructed features: references of subject a = e1, of b = e2. Images showing both sit between
    them; images that lost b point at a. The mean over subjects even rises; the minimum collapses."""
    refs = {"a": np.array([[1.0, 0.0, 0.0]]), "b": np.array([[0.0, 1.0, 0.0]])}
    both = np.array([[1.0, 1.0, 0.5]])
    lost_b = np.array([[1.0, 0.5, 0.0]])

    def records(feature):
        scores = {key: float(metrics.image_alignment(feature, ref)[0]) for key, ref in refs.items()}
        return [_record(seed, 0.3, (scores["a"], scores["b"]), (scores["a"], scores["b"])) for seed in (1, 2)]

    good, bad = aggregate(records(both)), aggregate(records(lost_b))
    assert bad["clip_i"]["mean"] > good["clip_i"]["mean"] > 0.66  # 0.671 vs 0.667
    assert bad["clip_i_min"]["mean"] == pytest.approx(1 / math.sqrt(5))  # b's cosine: 0.447
    assert good["clip_i_min"]["mean"] == pytest.approx(2 / 3)
    assert bad["worst_subject"]["dino"] == {"subject": "b", "value": pytest.approx(1 / math.sqrt(5))}


def test_clip_t_is_raw_by_default():
    image = np.array([[1.0, 0.0], [0.0, 2.0]])
    text = np.array([[math.cos(0.5), math.sin(0.5)], [1.0, -1.0]])
    np.testing.assert_allclose(metrics.clip_t(image, text), [math.cos(0.5), -math.sqrt(0.5)])


@pytest.mark.parametrize("function", [metrics.cosine_matrix, metrics.paired_cosine])
def test_shape_errors_name_which_input_is_wrong(function):
    with pytest.raises(ValueError, match=r"^a must be \[n, e\], got shape \(3,\)$"):
        function(np.ones(3), np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"^b must be \[n, e\], got shape \(1, 1, 3\)$"):
        function(np.ones((1, 3)), np.ones((1, 1, 3)))
    with pytest.raises(ValueError, match=r"^a has a zero feature vector at rows \[0, 2\]$"):
        function(np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"^b has a zero feature vector at rows \[1\]$"):
        function(np.ones((2, 2)), np.array([[1.0, 0.0], [0.0, 0.0]]))


def test_paired_features_of_two_shapes_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"^paired features must have one shape, got \(1, 3\) and \(2, 3\)$"):
        metrics.paired_cosine(np.ones((1, 3)), np.ones((2, 3)))


def test_image_alignment_names_references_of_the_wrong_rank_or_none():
    with pytest.raises(ValueError) as refused:
        metrics.image_alignment(np.ones((2, 3)), np.ones(3))
    assert str(refused.value) == "references must be [n, e], got shape (3,)"
    with pytest.raises(ValueError) as refused:
        metrics.image_alignment(np.ones((2, 3)), np.ones((0, 3)))
    assert str(refused.value) == "image_alignment needs at least one reference feature"


def test_features_as_tensors_of_any_dtype_or_with_gradients_score_in_float64():
    """Encoders hand over torch tensors: bfloat16 ones (numpy has no bfloat16) and ones still attached to
    a graph are read all the same; every input is scored in float64, as the same values given as float64
    numpy arrays (a float32 array too)."""
    import torch

    g = torch.Generator().manual_seed(0)
    generated, references = torch.randn(3, 8, generator=g), torch.randn(4, 8, generator=g)
    expected = metrics.image_alignment(generated.double().numpy(), references.double().numpy())
    assert expected.dtype == np.float64
    as_given = [
        (generated.numpy().astype(np.float32), references.numpy().astype(np.float32)),
        (generated.clone().requires_grad_(), references.clone().requires_grad_()),
    ]
    for a, b in as_given:
        scored = metrics.image_alignment(a, b)
        assert scored.dtype == np.float64
        np.testing.assert_array_equal(scored, expected)
    half = metrics.image_alignment(generated.bfloat16(), references.bfloat16())
    exact = metrics.image_alignment(generated.bfloat16().double().numpy(), references.bfloat16().double().numpy())
    assert half.dtype == np.float64
    np.testing.assert_array_equal(half, exact)


def test_clip_t_conventions_return_float64_whatever_the_input():
    for cosines in (np.array([0.25, -0.5], dtype=np.float32), [1, 0]):
        for convention in ("raw", "concept101"):
            assert metrics.clip_t_convention(cosines, convention).dtype == np.float64


def test_aggregate_errors_are_one_exact_line():
    with pytest.raises(ValueError, match=r"^aggregate got no image records$"):
        aggregate([])
    with pytest.raises(ValueError, match=r"^mean_std needs at least one value$"):
        mean_std([])
    record = {"file": "images/v/00001_s1_0.png", "subjects": ["x", "y"], "clip_i": {"x": 0.5}}
    message = r"^image 'images/v/00001_s1_0.png' has no clip_i score for subjects \['y'\]$"
    with pytest.raises(ValueError, match=message):
        per_image_values(record, "clip_i_min")


def test_mean_std_computes_in_float64_whatever_the_input():
    values = np.array([0.1, 0.2, 0.4], dtype=np.float32)
    exact = values.astype(np.float64)
    mean, std = mean_std(values)
    assert mean == pytest.approx(float(exact.mean()), rel=1e-15, abs=0)
    assert std == pytest.approx(float(exact.std(ddof=1)), rel=1e-15, abs=0)
