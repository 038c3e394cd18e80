"""Multi-subject routing on FLUX.1 through ``MIPAdapterPipeline`` with the tiny FLUX and XLabs-layout files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import CLIPVisionModelWithProjection

from mipadapter.checkpoint import load_adapter
from mipadapter.modeling.conditioning import CROSS_ATTENTION_KWARG
from mipadapter.pipeline import MIPAdapterPipeline, Subject
from mipadapter.testing.flux import tiny_flux_ip_files, tiny_flux_pipeline
from mipadapter.testing.mip import tiny_mip_pipeline

PROMPT = "a dog playing with a duck toy"


def run(mip, subjects, prompt=PROMPT, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return mip(prompt, subjects, output_type="np", generator=torch.Generator().manual_seed(0),
               show_progress=False, **kwargs)  # fmt: skip


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_flux_ip_files(tmp_path_factory.mktemp("xlabs"), seed=7, std=0.3)


@pytest.fixture(scope="module")
def mip():
    return tiny_mip_pipeline("flux")


def test_one_subject_uniform_is_diffusers_flux_ip_adapter(files, photo):
    """The same XLabs file: loaded by diffusers' load_ip_adapter, or by us and routed under uniform."""
    image = photo(3)
    theirs = tiny_flux_pipeline(seed=0)
    theirs.load_ip_adapter(str(files.folder), weight_name=files.weight_name,
                           image_encoder_pretrained_model_name_or_path=str(files.image_encoder),
                           image_encoder_dtype=torch.float32)  # fmt: skip
    theirs.set_ip_adapter_scale(0.8)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPT, ip_adapter_image=image, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images  # fmt: skip

    base = tiny_flux_pipeline(seed=0)
    adapter = load_adapter(files.folder / files.weight_name, base.transformer)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(files.image_encoder))
    ours = MIPAdapterPipeline(base, adapter, encoder)
    got = run(ours, [Subject("dog", image, scale=0.8)], rule="uniform").images
    plain = tiny_flux_pipeline(seed=0)
    plain.set_progress_bar_config(disable=True)
    without = plain(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert rel(expected, without) > 1e-3  # the image term is not a no-op
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_scale_zero_is_the_plain_flux_pipeline(mip, photo):
    plain = tiny_flux_pipeline(seed=0)
    plain.set_progress_bar_config(disable=True)
    expected = plain(PROMPT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    for rule in ("uniform", "paper"):
        subjects = [Subject("dog", photo(1), scale=0.0), Subject("duck toy", photo(2), scale=0.0)]
        np.testing.assert_array_equal(run(mip, subjects, rule=rule).images, expected)


@pytest.mark.parametrize("rule", ["uniform", "paper"])
def test_permuting_subjects_changes_nothing(mip, photo, rule):
    dog, toy = Subject("dog", photo(1), scale=0.7), Subject("duck toy", photo(2), scale=1.2)
    forward = run(mip, [dog, toy], rule=rule).images
    backward = run(mip, [toy, dog], rule=rule).images
    np.testing.assert_allclose(forward, backward, atol=1e-5, rtol=0)


def test_paper_routes_differently_from_uniform_and_regions_steer_it(mip, photo):
    subjects = [Subject("dog", photo(1)), Subject("duck toy", photo(2))]
    uniform = run(mip, subjects, rule="uniform").images
    paper = run(mip, subjects, rule="paper", return_relevance=True)
    assert rel(paper.images, uniform) > 1e-4
    boxed = [Subject("dog", photo(1), region=(0, 0, 32, 64)), Subject("duck toy", photo(2), region=(32, 0, 64, 64))]
    out = run(mip, boxed, rule="paper", return_relevance=True, height=64, width=96)
    dog = out.relevance[0]["dog"]
    assert dog.shape == (64, 96) and dog[:, :24].mean() > 10 * dog[:, 40:].mean()
    assert out.images.shape == (1, 64, 96, 3)


def test_true_cfg_gives_the_negative_call_the_unconditional_subjects(mip, photo):
    """diffusers runs the negative prompt as a second transformer call: it gets zero image tokens and the
    empty names (T5 rows 0..n_i−1 of ""), the positive call the subjects."""
    seen = []

    def record(module, args, kwargs):
        cond = kwargs["joint_attention_kwargs"][CROSS_ATTENTION_KWARG]
        seen.append(cond)

    subjects = [Subject("dog", photo(1)), Subject("duck toy", photo(2))]
    block = mip.pipe.transformer.transformer_blocks[0]  # inside the transformer: after the pipeline's hook
    hook = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = run(mip, subjects, negative_prompt="blurry", true_cfg_scale=3.0)
    finally:
        hook.remove()
    assert len(seen) == 4  # two steps, a positive and a negative call each
    positive, negative = seen[0], seen[1]
    assert positive is not negative
    assert all(cond is positive for cond in seen[0::2]) and all(cond is negative for cond in seen[1::2])
    zero = mip.adapter.project(torch.zeros(1, mip.adapter.config.image_embed_dim))[0]
    torch.testing.assert_close(negative.image_tokens[0, 0], zero)
    assert not torch.allclose(positive.image_tokens[0, 0], zero)
    assert out.settings["negative_prompt"] == "blurry" and out.settings["true_cfg_scale"] == 3.0
    plain = run(mip, subjects)
    assert plain.settings["negative_prompt"] is None and rel(out.images, plain.images) > 1e-4


def test_an_empty_negative_prompt_runs_true_cfg_as_in_diffusers(mip, photo):
    subjects = [Subject("dog", photo(1))]
    empty = run(mip, subjects, negative_prompt="", true_cfg_scale=3.0)
    assert empty.settings["negative_prompt"] == ""
    assert rel(empty.images, run(mip, subjects).images) > 1e-4  # a second, unconditional call was made


def test_flux_names_are_matched_with_t5(mip, photo):
    from mipadapter.alignment import SubjectAlignmentError

    with pytest.raises(SubjectAlignmentError, match="'cat' does not occur"):
        run(mip, [Subject("cat", photo(1))])
    assert run(mip, [Subject("cat", photo(1))], require_names_in_prompt=False).warnings[0].kind == "not_named"
