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
    kwargs.setdefault("output_type", "np")
    return mip(prompt, subjects, generator=torch.Generator().manual_seed(0), show_progress=False, **kwargs)


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


def seen_conditionings(mip, subjects, **kwargs):
    """Run a call and return (output, the conditioning every transformer call received, in order)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["joint_attention_kwargs"][CROSS_ATTENTION_KWARG])

    block = mip.pipe.transformer.transformer_blocks[0]  # inside the transformer: after the pipeline's hook
    hook = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = run(mip, subjects, **kwargs)
    finally:
        hook.remove()
    return out, seen


def black_tokens(mip):
    """The projected CLIP embedding of a black image: diffusers' and x-flux's negative image."""
    from mipadapter.pipeline.encoding import black_image, encode_photos

    embeds = encode_photos(mip.image_encoder, mip.feature_extractor, [black_image(mip.feature_extractor)], False)
    return mip.adapter.project(embeds)[0]


@pytest.mark.parametrize("negative_image", [None, "black", "zeros"])
def test_true_cfg_gives_the_negative_call_the_unconditional_subjects(mip, photo, negative_image):
    """diffusers runs the negative prompt as a second transformer call: it gets the negative image (by
    default a black image through the encoder, as diffusers and x-flux; or the zero embedding) and the
    empty names (T5 rows 0..n_i−1 of ""), the positive call the subjects."""
    subjects = [Subject("dog", photo(1)), Subject("duck toy", photo(2))]
    extra = {} if negative_image is None else {"negative_image": negative_image}
    out, seen = seen_conditionings(mip, subjects, negative_prompt="blurry", true_cfg_scale=3.0, **extra)
    assert len(seen) == 4  # two steps, a positive and a negative call each
    positive, negative = seen[0], seen[1]
    assert positive is not negative
    assert all(cond is positive for cond in seen[0::2]) and all(cond is negative for cond in seen[1::2])
    zero = mip.adapter.project(torch.zeros(1, mip.adapter.config.image_embed_dim))[0]
    expected = zero if negative_image == "zeros" else black_tokens(mip)
    assert not torch.allclose(zero, black_tokens(mip), atol=1e-3)  # the two choices differ
    for index in range(2):
        torch.testing.assert_close(negative.image_tokens[0, index], expected)
    assert not torch.allclose(positive.image_tokens[0, 0], expected)
    assert out.settings["negative_prompt"] == "blurry" and out.settings["true_cfg_scale"] == 3.0
    assert out.settings["negative_image"] == (negative_image or "black")
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


# --------------------------------------------------------------------- equal to diffusers' FLUX IP-Adapter


def diffusers_flux(files, scale):
    """diffusers' own FLUX IP-Adapter path on the fabricated XLabs file."""
    pipe = tiny_flux_pipeline(seed=0)
    pipe.load_ip_adapter(str(files.folder), weight_name=files.weight_name,
                         image_encoder_pretrained_model_name_or_path=str(files.image_encoder),
                         image_encoder_dtype=torch.float32)  # fmt: skip
    pipe.set_ip_adapter_scale(scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_flux(files):
    base = tiny_flux_pipeline(seed=0)
    encoder = CLIPVisionModelWithProjection.from_pretrained(str(files.image_encoder))
    return MIPAdapterPipeline(base, load_adapter(files.folder / files.weight_name, base.transformer), encoder)


def latents_of(pipe, **kwargs):
    """diffusers' packed latents [1, p, 64] of a 2-step call."""
    return pipe(PROMPT, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                **kwargs).images  # fmt: skip


@pytest.mark.parametrize("true_cfg", [None, {"negative_prompt": "", "true_cfg_scale": 4.0},
                                      {"negative_prompt": "blurry", "true_cfg_scale": 2.5}])  # fmt: skip
def test_uniform_latents_equal_diffusers_with_and_without_true_cfg(files, photo, true_cfg):
    """Default negatives on both sides: diffusers encodes a black image for the negative call; so do we."""
    image = photo(3)
    extra = true_cfg or {}
    expected = latents_of(diffusers_flux(files, 0.8), ip_adapter_image=image, **extra)
    ours = ours_flux(files)
    got = run(ours, [Subject("dog", image, scale=0.8)], rule="uniform", output_type="latent", **extra).images
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) <= 1e-4
    if true_cfg:
        zeros = run(ours, [Subject("dog", image, scale=0.8)], rule="uniform", output_type="latent",
                    negative_image="zeros", **extra).images  # fmt: skip
        assert float((zeros - expected).abs().max()) > 1e-3  # the zero embedding is another negative
        without = latents_of(diffusers_flux(files, 0.8), ip_adapter_image=image)
        assert float((without - expected).abs().max()) > 1e-3  # true CFG did something


def test_true_cfg_through_negative_embeddings_equals_the_string(mip, photo, files):
    subjects = [Subject("dog", photo(1)), Subject("duck toy", photo(2))]
    by_string = run(mip, subjects, negative_prompt="blurry", true_cfg_scale=3.0, max_sequence_length=64)
    embeds, pooled, _ = mip.pipe.encode_prompt(prompt="blurry", max_sequence_length=64)
    by_embeds, seen = seen_conditionings(mip, subjects, negative_prompt_embeds=embeds,
                                         negative_pooled_prompt_embeds=pooled, true_cfg_scale=3.0,
                                         max_sequence_length=64)  # fmt: skip
    np.testing.assert_array_equal(by_embeds.images, by_string.images)
    assert len(seen) == 4 and seen[0] is not seen[1]  # the negative call got the unconditional subjects
    torch.testing.assert_close(seen[1].image_tokens[0, 0], black_tokens(mip))
    assert by_embeds.settings["negative_prompt"] is None and by_embeds.settings["negative_prompt_embeds"] is True
    assert "negative_prompt_embeds" not in by_string.settings
    # and diffusers' own call, given the same embeddings, equals its call with the string
    image = photo(3)
    theirs = diffusers_flux(files, 0.8)
    embeds, pooled, _ = theirs.encode_prompt(prompt="blurry")
    expected = latents_of(theirs, ip_adapter_image=image, negative_prompt="blurry", true_cfg_scale=3.0)
    ours = run(ours_flux(files), [Subject("dog", image, scale=0.8)], rule="uniform", output_type="latent",
               negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled, true_cfg_scale=3.0).images
    assert float((ours - expected).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="not both"):
        run(mip, subjects, negative_prompt="x", negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled)


@pytest.mark.parametrize("length", [64, 128])
def test_name_rows_are_t5_at_the_calls_max_sequence_length(mip, photo, length):
    """T5 runs without a mask in FluxPipeline, so the padding length changes the rows: the names (and the
    empty names of the negative call) are encoded at the call's max_sequence_length."""
    subjects = [Subject("dog", photo(1)), Subject("duck toy", photo(2))]
    out, seen = seen_conditionings(mip, subjects, negative_prompt="", true_cfg_scale=2.0,
                                   max_sequence_length=length)  # fmt: skip
    assert out.settings["max_sequence_length"] == length
    t5 = mip.pipe._get_t5_prompt_embeds(prompt=["dog", "duck toy", ""], max_sequence_length=length)
    default = mip.pipe._get_t5_prompt_embeds(prompt=["dog"], max_sequence_length=512)
    positive, negative = seen[0], seen[1]
    assert rel(positive.name_embeds[0, 0, :1].numpy(), default[0, :1].numpy()) > 1e-3  # the length matters
    torch.testing.assert_close(positive.name_embeds[0, 0, :1], t5[0, :1])
    torch.testing.assert_close(positive.name_embeds[0, 1, :2], t5[1, :2])
    torch.testing.assert_close(negative.name_embeds[0, 0, :1], t5[2, :1])
    torch.testing.assert_close(negative.name_embeds[0, 1, :2], t5[2, :2])


def test_names_are_checked_in_the_text_t5_encodes(mip, photo):
    from mipadapter.alignment import SubjectAlignmentError

    with pytest.raises(SubjectAlignmentError, match="'dog' does not occur"):
        run(mip, [Subject("dog", photo(1))], prompt_2="a cat on a sofa")
    out = run(mip, [Subject("dog", photo(1))], prompt="a photo, soft light", prompt_2="a dog on a sofa")
    assert out.settings["prompt_2"] == "a dog on a sofa"


@pytest.mark.parametrize("key", ["ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                                 "negative_ip_adapter_image_embeds"])  # fmt: skip
def test_diffusers_ip_adapter_arguments_are_refused_in_one_line(mip, photo, key):
    with pytest.raises(ValueError) as error:
        run(mip, [Subject("dog", photo(1))], **{key: photo(2)})
    assert str(error.value) == (
        f"{key} is not taken: MIPAdapterPipeline takes reference photos as subjects, Subject(name, images) or "
        "Subject(name, image_embeds=...), and the negative image as negative_image='black' or 'zeros'"
    )


def test_official_is_not_offered_on_flux(mip, photo):
    with pytest.raises(ValueError, match="^rule 'official' is not offered on FLUX"):
        run(mip, [Subject("dog", photo(1))], rule="official")


# --------------------------------------------------------------------- per-block scales


RAMP = [0.3, 0.9, 1.4]  # one per double block of the tiny FLUX (diffusers' docstring ramps 0.3 → 0.92 over 19)


@pytest.mark.parametrize("true_cfg", [None, {"negative_prompt": "", "true_cfg_scale": 3.0}])
def test_per_block_scales_equal_diffusers_set_ip_adapter_scale(files, photo, true_cfg):
    image = photo(4)
    extra = true_cfg or {}
    expected = latents_of(diffusers_flux(files, list(RAMP)), ip_adapter_image=image, **extra)
    ours = ours_flux(files)
    out = run(ours, [Subject("dog", image, scale=list(RAMP))], rule="uniform", output_type="latent", **extra)
    assert float((out.images - expected).abs().max()) <= 1e-4
    assert out.settings["scales"] == {"dog": RAMP}
    flat = run(ours, [Subject("dog", image, scale=0.9)], rule="uniform", output_type="latent", **extra).images
    assert float((flat - expected).abs().max()) > 1e-3  # the per-block values reached their blocks
    reversed_ramp = latents_of(diffusers_flux(files, RAMP[::-1]), ip_adapter_image=image, **extra)
    assert float((reversed_ramp - expected).abs().max()) > 1e-3


def test_per_block_scales_mix_with_plain_scales_under_paper(mip, photo):
    """A subject's list replaces its scale block by block; the other subjects keep theirs. All blocks at the
    same value equal that plain scale."""
    toy = Subject("duck toy", photo(2), scale=0.7)
    same = run(mip, [Subject("dog", photo(1), scale=[1.1] * 3), toy], rule="paper").images
    plain = run(mip, [Subject("dog", photo(1), scale=1.1), toy], rule="paper").images
    np.testing.assert_allclose(same, plain, atol=1e-6, rtol=0)
    ramped = run(mip, [Subject("dog", photo(1), scale=[0.0, 1.1, 2.0]), toy], rule="paper").images
    assert rel(ramped, plain) > 1e-4


@pytest.mark.parametrize("scale, message", [
    ([0.5, 1.0], "subject 'dog': give one scale per FLUX double block, 3, got 2"),
    ({"up": 1.0}, "subject 'dog': per-block scales on FLUX are a list, one per double block (3)"),
])  # fmt: skip
def test_per_block_scales_of_the_wrong_form_are_refused(mip, photo, scale, message):
    with pytest.raises(ValueError) as error:
        run(mip, [Subject("dog", photo(1), scale=scale)])
    assert str(error.value) == message


def test_names_without_a_sequence_length_are_encoded_at_the_pipelines_default_512():
    """T5 runs without an attention mask, so the padding length changes every row: a name encoded
    without the call's length gets FluxPipeline's default (512), not some other length."""
    from mipadapter.pipeline.encoding import encode_names, max_sequence_length

    pipe = tiny_flux_pipeline()
    assert max_sequence_length(pipe) == 512 and max_sequence_length(pipe, 77) == 77
    with torch.no_grad():
        default, mask = encode_names(pipe, ["cat", "red hat"], "cpu")
        at_512, _ = encode_names(pipe, ["cat", "red hat"], "cpu", sequence_length=512)
        at_64, _ = encode_names(pipe, ["cat", "red hat"], "cpu", sequence_length=64)
    torch.testing.assert_close(default, at_512, rtol=0, atol=0)
    assert mask.sum(-1).tolist()[0] >= 1 and not torch.allclose(default, at_64)


def test_names_are_tokenized_by_t5_on_flux_and_by_every_clip_tokenizer_elsewhere():
    """Guards tokenizers_of, which decides whose token counts align the subjects' names: FLUX's T5 alone
    (its CLIP tokenizer feeds only the pooled vector), SDXL's two CLIP tokenizers in order, SD1.5's one,
    and a pipeline holding only a second tokenizer (None or absent first) that one."""
    from types import SimpleNamespace

    from mipadapter.pipeline.encoding import tokenizers_of

    flux = tiny_flux_pipeline()
    assert tokenizers_of(flux) == [flux.tokenizer_2] and flux.tokenizer is not None
    first, second = object(), object()
    assert tokenizers_of(SimpleNamespace(tokenizer=first, tokenizer_2=second)) == [first, second]
    assert tokenizers_of(SimpleNamespace(tokenizer=first)) == [first]
    assert tokenizers_of(SimpleNamespace(tokenizer=None, tokenizer_2=second)) == [second]
    assert tokenizers_of(SimpleNamespace(tokenizer_2=second)) == [second]
