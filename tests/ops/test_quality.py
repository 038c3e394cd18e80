"""The object quality score against a direct loop over the formula of docs/method.md."""

from __future__ import annotations

import math

import pytest
import torch

from mipadapter.ops.quality import object_similarity, pairwise_cosine, s_pair, s_quality, s_single


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().tolist(), b.double().tolist()
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def loop_scores(text: torch.Tensor, image: torch.Tensor) -> tuple[float, float]:
    """S_single and S_pair of one image, [n, e] each, by the formula's loops."""
    n = image.shape[0]
    single = sum(cos(text[o], image[o]) for o in range(n)) / n if n else math.nan
    pairs = [cos(image[a], image[b]) for a in range(n) for b in range(n) if a != b]  # ordered: n(n-1)
    pair = -sum(pairs) / len(pairs) if pairs else math.nan
    return single, pair


@pytest.mark.parametrize("n,e", [(2, 8), (3, 16), (5, 1024)])
def test_single_image_matches_the_loop(n, e):
    generator = torch.Generator().manual_seed(n * 100 + e)
    text, image = torch.randn(n, e, generator=generator), torch.randn(n, e, generator=generator)
    single, pair = loop_scores(text, image)
    assert s_single(text, image).item() == pytest.approx(single, abs=1e-5)
    assert s_pair(image).item() == pytest.approx(pair, abs=1e-5)
    assert s_quality(text, image).item() == pytest.approx(single + pair, abs=1e-5)
    assert s_quality(text, image, pair=False).item() == pytest.approx(single, abs=1e-5)


@pytest.mark.parametrize("batch", [(4,), (2, 3)])
def test_padded_batches_match_the_loop_per_image(batch):
    generator = torch.Generator().manual_seed(len(batch))
    n, e = 4, 12
    text = torch.randn(*batch, n, e, generator=generator, dtype=torch.float64)
    image = torch.randn(*batch, n, e, generator=generator, dtype=torch.float64)
    counts = torch.randint(0, n + 1, batch, generator=generator)
    counts.view(-1)[0], counts.view(-1)[1] = 1, n  # always cover the one-object and the full case
    mask = torch.arange(n) < counts[..., None]  # [..., n]
    # garbage in the padding must not leak into the scores
    text, image = text.masked_fill(~mask[..., None], 1e6), image.masked_fill(~mask[..., None], -1e6)
    single, pair = s_single(text, image, mask), s_pair(image, mask)
    assert single.shape == batch and pair.shape == batch
    for index in torch.cartesian_prod(*[torch.arange(b) for b in batch]).view(-1, len(batch)).tolist():
        k = int(counts[tuple(index)])
        want_single, want_pair = loop_scores(text[tuple(index)][:k], image[tuple(index)][:k])
        got_single, got_pair = single[tuple(index)].item(), pair[tuple(index)].item()
        if k == 0:
            assert math.isnan(got_single) and math.isnan(got_pair)
        else:
            assert got_single == pytest.approx(want_single, abs=1e-12)
        if k < 2:
            assert math.isnan(got_pair)
        else:
            assert got_pair == pytest.approx(want_pair, abs=1e-12)


def test_identical_objects_give_s_pair_minus_one():
    image = torch.randn(1, 7).repeat(3, 1)
    assert s_pair(image).item() == pytest.approx(-1.0, abs=1e-6)
    assert s_pair(image * torch.tensor([[1.0], [2.0], [0.5]])).item() == pytest.approx(
        -1.0, abs=1e-6
    )  # scale-free


def test_orthogonal_objects_give_s_pair_zero_and_opposite_ones_plus_one():
    assert s_pair(torch.eye(3)).item() == pytest.approx(0.0, abs=1e-7)
    v = torch.randn(5)
    assert s_pair(torch.stack([v, -v])).item() == pytest.approx(1.0, abs=1e-6)


def test_one_object_has_no_s_pair():
    text, image = torch.randn(1, 4), torch.randn(1, 4)
    assert math.isnan(s_pair(image).item())
    assert math.isnan(s_quality(text, image).item())  # multi-subject score undefined
    assert s_quality(text, image, pair=False).item() == pytest.approx(cos(text[0], image[0]), abs=1e-6)


def test_half_precision_inputs_are_summed_in_float32():
    generator = torch.Generator().manual_seed(0)
    text, image = torch.randn(3, 64, generator=generator), torch.randn(3, 64, generator=generator)
    result = s_quality(text.half(), image.half())
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(
        s_quality(text.half().float(), image.half().float()).item(), abs=1e-6
    )


def test_helpers_shapes_and_errors():
    x = torch.randn(2, 3, 5)
    assert object_similarity(x, x).shape == (2, 3)
    assert pairwise_cosine(x).shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 4\)"):
        object_similarity(x, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        s_pair(x, torch.ones(2, 4, dtype=torch.bool))


def test_the_mask_error_names_both_shapes():
    x = torch.randn(2, 3, 5)
    message = r"^mask shape \(2, 4\) must equal embeddings shape without the last dim \(2, 3\)$"
    with pytest.raises(ValueError, match=message):
        s_single(x, x, torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_a_zero_one_mask_of_another_dtype_reads_as_booleans(dtype):
    generator = torch.Generator().manual_seed(5)
    text, image = torch.randn(2, 4, 6, generator=generator), torch.randn(2, 4, 6, generator=generator)
    mask = torch.tensor([[True, True, False, True], [True, False, True, False]])
    for score, inputs in ((s_single, (text, image)), (s_pair, (image,)), (s_quality, (text, image))):
        torch.testing.assert_close(score(*inputs, mask.to(dtype)), score(*inputs, mask))


@pytest.mark.parametrize("batch", [(3,), (2, 2)])
def test_batches_without_a_mask_score_each_image_alone(batch):
    """With no mask every object of every image counts: a batch scores each image as it scores alone
    (the all-True mask has the shape [..., n] of the batch, not of its first dims)."""
    generator = torch.Generator().manual_seed(len(batch) + 7)
    text = torch.randn(*batch, 3, 8, generator=generator, dtype=torch.float64)
    image = torch.randn(*batch, 3, 8, generator=generator, dtype=torch.float64)
    single, pair, quality = s_single(text, image), s_pair(image), s_quality(text, image)
    assert single.shape == pair.shape == quality.shape == batch
    for index in torch.cartesian_prod(*[torch.arange(b) for b in batch]).view(-1, len(batch)).tolist():
        want_single, want_pair = loop_scores(text[tuple(index)], image[tuple(index)])
        assert single[tuple(index)].item() == pytest.approx(want_single, abs=1e-12)
        assert pair[tuple(index)].item() == pytest.approx(want_pair, abs=1e-12)
        assert quality[tuple(index)].item() == pytest.approx(want_single + want_pair, abs=1e-12)


@pytest.mark.parametrize("pair", [True, False])
def test_s_quality_applies_the_mask_to_both_terms(pair):
    generator = torch.Generator().manual_seed(9)
    text = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    image = torch.randn(2, 4, 6, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    text, image = text.masked_fill(~mask[..., None], 1e6), image.masked_fill(~mask[..., None], -1e6)
    quality = s_quality(text, image, mask, pair=pair)
    for row, k in enumerate((3, 2)):
        single, pair_score = loop_scores(text[row, :k], image[row, :k])
        assert quality[row].item() == pytest.approx(single + pair_score if pair else single, abs=1e-12)


def test_scores_stay_on_the_inputs_device():
    """No device is chosen inside: on the meta device (a stand-in for a GPU) every score stays there.
    Fails when a helper tensor (the all-True mask, the pair mask) is made on the default device."""
    text, image = torch.randn(2, 3, 5, device="meta"), torch.randn(2, 3, 5, device="meta")
    mask = torch.ones(2, 3, dtype=torch.bool, device="meta")
    results = (s_single(text, image), s_pair(image), s_quality(text, image), s_quality(text, image, mask))
    for result in results:
        assert result.device.type == "meta" and result.shape == (2,)
