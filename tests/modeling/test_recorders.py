"""The pipeline's recorders against loop references: ``RelevanceRecorder`` (routing maps averaged over
layers and steps at the latent size) and ``ShareMeter`` (each subject's share of the image)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mipadapter.modeling.conditioning import RelevanceRecorder, ShareMeter


def ref_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PyTorch's bilinear resize with ``align_corners=False``, by its formula: [h, w] → size."""
    in_h, in_w = image.shape
    out = np.zeros(size)
    for y in range(size[0]):
        sy = max((y + 0.5) * in_h / size[0] - 0.5, 0.0)
        y0 = min(int(math.floor(sy)), in_h - 1)
        y1, wy = min(y0 + 1, in_h - 1), sy - y0
        for x in range(size[1]):
            sx = max((x + 0.5) * in_w / size[1] - 0.5, 0.0)
            x0 = min(int(math.floor(sx)), in_w - 1)
            x1, wx = min(x0 + 1, in_w - 1), sx - x0
            top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
            bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
            out[y, x] = top * (1 - wy) + bottom * wy
    return out


def ref_layer_maps(relevance: torch.Tensor, grid, keep_last: int, latent) -> np.ndarray:
    """One layer's recorded maps: the last rows, each map over its maximum, on the latent grid."""
    rows = relevance.double().numpy()[-keep_last:]
    out = np.zeros((rows.shape[0], rows.shape[1], *latent))
    for row in range(rows.shape[0]):
        for subject in range(rows.shape[1]):
            values = rows[row, subject]
            top = values.max()
            scaled = values / top if top > 0 else values
            out[row, subject] = ref_bilinear(scaled.reshape(grid), latent)
    return out


LATENT = (5, 7)  # odd and non-square: the layer grids are (5, 7), (3, 4), (2, 2)
LAYERS = [(3, 4), (2, 2), (3, 4), (5, 7), (3, 4)]  # the grids of the layers recorded, in call order


def recorded_layers(seed: int = 0) -> list[torch.Tensor]:
    """relevance [3, 2, p] per layer: softmaxes over p (maxima below 1), subject 1 of row 2 absent (zero)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for grid in LAYERS:
        maps = torch.softmax(torch.randn(3, 2, grid[0] * grid[1], generator=g) * 2, dim=-1)
        maps[2, 1] = 0.0
        layers.append(maps)
    return layers


@pytest.mark.parametrize("keep_last", [2, 3])
def test_relevance_recorder_matches_the_loop(keep_last):
    recorder = RelevanceRecorder(list(LATENT), keep_last)
    assert recorder.latent_size == LATENT
    layers = recorded_layers()
    for maps, grid in zip(layers, LAYERS, strict=True):
        recorder.add(maps, grid)
    per_layer = [ref_layer_maps(m, g, keep_last, LATENT) for m, g in zip(layers, LAYERS, strict=True)]
    by_grid = recorder.by_resolution()
    assert set(by_grid) == set(LAYERS)
    for grid in set(LAYERS):
        mine = [maps for maps, g in zip(per_layer, LAYERS, strict=True) if g == grid]
        assert by_grid[grid].shape == (keep_last, 2, *LATENT)
        np.testing.assert_allclose(by_grid[grid].double().numpy(), sum(mine) / len(mine), atol=1e-6)
    mean = sum(per_layer) / len(per_layer)
    top = mean.reshape(*mean.shape[:2], -1).max(axis=-1)[..., None, None]
    expected = np.where(top > 0, mean / np.where(top > 0, top, 1.0), 0.0)
    average = recorder.average()
    assert average.shape == (keep_last, 2, *LATENT) and torch.isfinite(average).all()
    np.testing.assert_allclose(average.double().numpy(), expected, atol=1e-6)


def test_relevance_recorder_refuses_early_calls_with_one_line():
    with pytest.raises(RuntimeError, match=r"^the recorder's latent size is not known yet$"):
        RelevanceRecorder(None, 1).add(torch.rand(1, 1, 4), (2, 2))
    with pytest.raises(RuntimeError, match=r"^no maps were recorded$"):
        RelevanceRecorder(LATENT, 1).average()
    assert RelevanceRecorder(None, 1).latent_size is None


def ref_shares(layers: list[torch.Tensor], first: list[int]) -> np.ndarray:
    """Sum over layers of the mean over positions; each subject reads its first condition; rows sum to 1."""
    sums = sum(layer.double().numpy().mean(axis=1) for layer in layers)  # [b, N]
    per_subject = sums[:, first]
    totals = per_subject.sum(axis=1, keepdims=True)
    return np.where(totals > 0, per_subject / np.where(totals > 0, totals, 1.0), 0.0)


def test_share_meter_matches_the_loop():
    """Two layers of different sizes, shares in float64 (the meter keeps float32); row 1 is never routed."""
    g = torch.Generator().manual_seed(1)
    meter = ShareMeter(2, 3, torch.device("cpu"))
    assert meter.sums.shape == (2, 3) and meter.sums.dtype == torch.float32 and not meter.sums.any()
    layers = [torch.rand(2, p, 3, generator=g, dtype=torch.float64) for p in (16, 4)]
    for layer in layers:
        layer[1] = 0.0
        meter.add(layer)
    first = [0, 2]  # subject 0 owns conditions 0 and 1, subject 1 condition 2
    shares = meter.shares(torch.tensor(first))
    assert shares.shape == (2, 2) and shares.dtype == torch.float32
    np.testing.assert_allclose(shares.double().numpy(), ref_shares(layers, first), atol=1e-6)
    assert shares[0].sum().item() == pytest.approx(1.0) and not shares[1].any()


def test_share_meter_stays_on_its_device():
    """The sums are made on the device given (meta stands in for a GPU), so adding a layer's shares
    there works; fails when they are made on the default device."""
    meter = ShareMeter(2, 3, torch.device("meta"))
    meter.add(torch.rand(2, 16, 3, device="meta"))
    assert meter.sums.device.type == "meta"
    assert meter.shares(torch.tensor([0, 2], device="meta")).shape == (2, 2)


def test_share_meter_normalises_each_row_on_its_own_below_one():
    """One layer over four conditions, two subjects of two photos each: the subjects' first columns sum
    to less than 1 in every row, and both rows are routed, each with its own total. Each row of the
    shares sums to 1 and matches the loop. Guards the row totals taken over the whole batch (both rows
    would then sum to less than 1 together) and a floor of 1 on them (rows summing below 1)."""
    g = torch.Generator().manual_seed(3)
    for positions in (6, 20):
        meter = ShareMeter(2, 4, torch.device("cpu"))
        layer = torch.rand(2, positions, 4, generator=g).softmax(dim=-1)
        layer[1] *= 0.5  # the second row's totals differ from the first's
        meter.add(layer)
        first = [0, 2]
        shares = meter.shares(torch.tensor(first))
        assert float(meter.sums[:, first].sum(dim=1).max()) < 1.0  # the case under test
        np.testing.assert_allclose(shares.double().numpy(), ref_shares([layer], first), atol=1e-6)
        torch.testing.assert_close(shares.sum(dim=1), torch.ones(2))
