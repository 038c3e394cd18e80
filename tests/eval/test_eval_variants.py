"""Variants → pipeline call arguments (rules, baselines, Table 4 ablations), with a fake pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fakes import FakePipeline, make_concept101

from mipadapter.eval.datasets import concept101_cases
from mipadapter.eval.detect import FixedBoxDetector
from mipadapter.eval.generate import ImageKey, generate_variant, image_seed
from mipadapter.eval.references import metric_references
from mipadapter.eval.variants import VARIANTS, GenerationSettings, Variant, resolve_variants


def test_resolve_groups_order_and_errors():
    names = [v.name for v in resolve_variants("table4")]
    assert names[0] == "uniform" and set(names) == {
        "uniform",
        "t4-local-add",
        "t4-relevance",
        "t4-text-weight",
        "official",
    }
    assert [v.name for v in resolve_variants(["t4-local-add"])] == [
        "uniform",
        "t4-local-add",
    ]  # its box source
    assert [v.name for v in resolve_variants("official,official,paper")] == ["official", "paper"]
    assert {v.name for v in resolve_variants("all")} == set(VARIANTS)
    with pytest.raises(ValueError, match="unknown variant 'offical'"):
        resolve_variants("offical")
    with pytest.raises(ValueError, match="model must be 'mip' or 'ip', got 'sd'"):
        Variant("x", "", model="sd")
    with pytest.raises(ValueError, match="needs a box_source"):
        Variant("x", "", region="detected")


FAST = GenerationSettings(num_inference_steps=1)


def _run(tmp_path, names, pipe, detector=None, settings=FAST):
    root = make_concept101(tmp_path / "c101")
    cases = concept101_cases(root, combinations=[0])[:1]

    def refs(subject):
        return metric_references(root, subject)

    for variant in resolve_variants(names):
        generate_variant(
            pipe,
            cases,
            variant,
            out_dir=tmp_path / "run",
            seeds=[7],
            images_per_prompt=1,
            settings=settings,
            references=refs,
            detector=detector,
        )
    return {
        call_variant: call
        for call_variant, call in zip([v.name for v in resolve_variants(names)], pipe.calls, strict=True)
    }


def test_table4_variants_become_these_pipeline_calls(tmp_path):
    pipe = FakePipeline()
    detector = FixedBoxDetector({"backpack": (0, 0, 16, 32)})  # no box for the teapot
    calls = _run(tmp_path, "table4", pipe, detector)
    assert calls["uniform"]["rule"] == "uniform" and calls["uniform"]["use_text_weight"] is False
    assert all(s.region is None and s.scale is None for s in calls["uniform"]["subjects"])
    local = calls["t4-local-add"]
    assert local["rule"] == "uniform"
    assert [s.region for s in local["subjects"]] == [
        (0.0, 0.0, 16.0, 32.0),
        None,
    ]  # teapot not found: everywhere
    boxes = json.loads(ImageKey("uniform", 0, 7, 0).path(tmp_path / "run", "boxes", ".json").read_text())
    assert boxes == {"detector": "fixed-boxes", "boxes": [[0.0, 0.0, 16.0, 32.0], None]}
    relevance = calls["t4-relevance"]
    assert (relevance["rule"], relevance["use_text_weight"]) == ("official", False)
    text = calls["t4-text-weight"]
    assert (text["rule"], text["use_text_weight"]) == ("official", True)
    assert all(np.array_equal(s.region, np.ones((1, 1))) for s in text["subjects"])  # relevance replaced by 1
    assert [s.scale for s in text["subjects"]] == [1.0, 1.0]  # default 0.5 × 2 subjects
    assert calls["official"]["rule"] == "official" and calls["official"]["use_text_weight"] is None
    generator = calls["official"]["generator"]
    assert len(generator) == 1 and generator[0].initial_seed() == image_seed(7, 0) == 7


def test_local_add_needs_a_detector_and_the_source_image(tmp_path):
    with pytest.raises(ValueError, match="needs a detector"):
        _run(tmp_path, "t4-local-add", FakePipeline())


def test_scale_given_is_multiplied_for_text_weight_only(tmp_path):
    calls = _run(
        tmp_path,
        ["t4-text-weight"],
        FakePipeline(),
        settings=GenerationSettings(num_inference_steps=1, scale=0.75),
    )
    assert [s.scale for s in calls["t4-text-weight"]["subjects"]] == [1.5, 1.5]


def test_settings_are_checked_and_pass_the_authors_negative_prompt():
    from mipadapter.config import AUTHORS_NEGATIVE_PROMPT as PIPELINE_DEFAULT
    from mipadapter.eval.variants import AUTHORS_NEGATIVE_PROMPT

    assert (
        AUTHORS_NEGATIVE_PROMPT
        == PIPELINE_DEFAULT
        == "monochrome, lowres, bad anatomy, worst quality, low quality"
    )
    settings = GenerationSettings()
    assert settings.call_kwargs()["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert settings.to_json()["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT  # recorded in run.json
    assert "negative_prompt" not in GenerationSettings(negative_prompt="").base_call_kwargs()  # off
    for bad, message in (
        (dict(num_inference_steps=0), "num_inference_steps must be an integer between 1 and 10000, got 0"),
        (dict(num_inference_steps=10_001), "num_inference_steps must be an integer between 1 and 10000, got 10001"),
        (dict(height=50), "height must be a multiple of 8 between 8 and 8192 pixels, got 50"),
        (dict(width=8200), "width must be a multiple of 8 between 8 and 8192 pixels, got 8200"),
        (dict(scale=float("inf")), "scale must be a finite number between 0 and 100, got inf"),
        (dict(guidance_scale=-1.0), "guidance_scale must be a finite number between 0 and 1000, got -1.0"),
        (dict(multi_image="concat"), "multi_image must be 'mean' or 'each', got 'concat'"),
    ):
        with pytest.raises(ValueError, match=message):
            GenerationSettings(**bad)


def test_image_seeds():
    assert [image_seed(420, k) for k in range(3)] == [420, 420001, 420002]
    import torch

    from mipadapter.limits import SEED_RANGE

    top = SEED_RANGE[1]  # every seed of the one range gives image seeds a generator takes
    for k in range(3):
        assert SEED_RANGE[0] <= image_seed(top, k) <= top
        torch.Generator().manual_seed(image_seed(top, k))
    with pytest.raises(ValueError, match="got -1"):
        image_seed(420, -1)
