"""Routing-map figures and the saved maps they are drawn from."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mipadapter.eval.figures import (
    LABEL_HEIGHT,
    attention_comparison,
    attention_figure,
    colorize,
    contact_sheet,
    overlay,
    routing_figure,
)
from mipadapter.eval.generate import load_maps, save_maps


def test_colorize_ramp_ends_and_clipping():
    image = colorize(np.array([[0.0, 1.0, -3.0, 7.0]]))
    assert image.size == (4, 1)
    assert image.getpixel((0, 0)) == (68, 1, 84) == image.getpixel((2, 0))
    assert image.getpixel((1, 0)) == (253, 231, 37) == image.getpixel((3, 0))
    with pytest.raises(ValueError, match=r"must be \[H, W\], got shape \(4,\)"):
        colorize(np.zeros(4))


def test_overlay_stretches_each_map_and_keeps_the_image_size():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    low = overlay(image, np.array([[0.2, 0.4]]), alpha=1.0)
    assert low.size == (40, 20)
    assert low.getpixel((0, 10)) == (68, 1, 84) and low.getpixel((39, 10)) == (253, 231, 37)
    assert overlay(image, np.zeros((2, 2)), alpha=0.0).getpixel((5, 5)) == (0, 0, 0)
    with pytest.raises(ValueError, match="alpha must lie in"):
        overlay(image, np.zeros((2, 2)), alpha=2)


def test_routing_figure_and_contact_sheet_layout():
    image = Image.new("RGB", (64, 64), (200, 10, 10))
    maps = [np.eye(64, dtype=np.float32), np.ones((64, 64), np.float32)]
    grids = [{(8, 8): maps[0], (4, 4): maps[0]}, {(8, 8): maps[1], (4, 4): maps[1]}]
    figure = routing_figure(image, ["cat", "dog"], maps, grids, tile=50)
    assert figure.size == (4 * 50, 2 * (50 + LABEL_HEIGHT))  # image, mean, 8x8, 4x4 per subject row
    refs = [[Image.new("RGB", (30, 60))] * 2, [Image.new("RGB", (60, 30))]]
    sheet = contact_sheet("a cat and a dog", refs, ["cat", "dog"], image, maps, tile=40)
    assert sheet.width == 4 * 40  # the longest row: two references, the result, the map
    with pytest.raises(ValueError, match="2 names, 1 maps and 2 grid sets differ"):
        routing_figure(image, ["cat", "dog"], maps[:1], grids)


def test_maps_round_trip_by_subject_index(tmp_path):
    rng = np.random.default_rng(0)
    # the pipeline labels a repeated name "dog#2"; maps are kept by subject index
    averages = {"dog": rng.random((6, 6), dtype=np.float32), "dog#2": rng.random((6, 6), dtype=np.float32)}
    by_res = {
        "dog": {(2, 3): np.zeros((6, 6), np.float32), (1, 2): np.ones((6, 6), np.float32)},
        "dog#2": {(1, 2): np.full((6, 6), 2, np.float32)},
    }
    save_maps(tmp_path / "m.npz", ["dog", "dog"], averages, by_res)
    names, got, grids = load_maps(tmp_path / "m.npz")
    assert names == ["dog", "dog"]
    np.testing.assert_array_equal(got[1], averages["dog#2"])
    assert sorted(grids[0]) == [(1, 2), (2, 3)]
    np.testing.assert_array_equal(grids[1][(1, 2)], np.full((6, 6), 2))
    with pytest.raises(ValueError, match=r"2 maps for 3 subjects"):
        save_maps(tmp_path / "x.npz", ["a", "b", "c"], averages, None)
    assert not (tmp_path / "x.npz").exists()


def test_attention_figures_layout():
    image = Image.new("RGB", (64, 64), (10, 200, 10))
    maps = [np.eye(64, dtype=np.float32), np.ones((64, 64), np.float32)]
    assert attention_figure(image, ["cat", "dog"], maps, tile=50).size == (2 * 50, 2 * (50 + LABEL_HEIGHT))
    both = attention_comparison(
        ("before", "after"), (image, image), ["cat", "dog"], (maps, maps[::-1]), tile=50
    )
    assert both.size == (4 * 50, 2 * (50 + LABEL_HEIGHT))
    with pytest.raises(ValueError, match="2 names but 1 and 2 maps"):
        attention_comparison(("a", "b"), (image, image), ["cat", "dog"], (maps[:1], maps))


def test_fig6_from_two_checkpoints(tmp_path, tiny_encoders):
    """`eval dreambench --figures` with two adapters, then `eval compare`: each subject's image attention
    in both runs, side by side (the paper's Fig. 6 before/after training)."""
    from eval_fakes import make_dreambench

    from mipadapter.cli.main import main
    from mipadapter.eval.runner import run_dreambench
    from mipadapter.eval.variants import GenerationSettings
    from mipadapter.testing.mip import tiny_mip_pipeline

    root = make_dreambench(tmp_path / "db")
    for run, seed in (("before", 0), ("after", 3)):  # two checkpoints: two random tiny adapters
        run_dreambench(
            root,
            tmp_path / run,
            mode="multi",
            pairs=[("backpack", "dog")],
            pipelines={"mip": lambda seed=seed: tiny_mip_pipeline("sdxl", "basic", seed=seed)},
            encoders=tiny_encoders,
            settings=GenerationSettings(num_inference_steps=1),
            seeds=(420,),
            images_per_prompt=1,
            figures=True,
            score=False,
        )
        names, maps, _ = load_maps(tmp_path / run / "attention" / "official" / "00000_s420_0.npz")
        assert names == ["backpack", "dog"] and maps[0].shape == (64, 64)
        assert (tmp_path / run / "attention_figures" / "official" / "00000_s420_0.png").is_file()
    before = load_maps(tmp_path / "before" / "attention" / "official" / "00000_s420_0.npz")[1]
    after = load_maps(tmp_path / "after" / "attention" / "official" / "00000_s420_0.npz")[1]
    assert not np.allclose(before[0], after[0])
    code = main(
        [
            "eval",
            "compare",
            str(tmp_path / "before"),
            str(tmp_path / "after"),
            "--out",
            str(tmp_path / "fig6"),
        ]
    )
    assert code == 0
    figures = sorted((tmp_path / "fig6" / "official").glob("*.png"))
    assert [f.name for f in figures] == ["00000_s420_0.png", "00001_s420_0.png"]
    assert Image.open(figures[0]).size == (4 * 192, 2 * (192 + LABEL_HEIGHT))
