"""What a generation call reports and accepts beyond the image: warnings, settings, names outside the
prompt, negative prompts, other diffusers pipelines at other sizes, EXIF photos, compilation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mipadapter.alignment import SubjectAlignmentError
from mipadapter.config import AUTHORS_NEGATIVE_PROMPT
from mipadapter.modeling.conditioning import CROSS_ATTENTION_KWARG
from mipadapter.photos import EXIF_ORIENTATION
from mipadapter.pipeline import MIPAdapterPipeline, Subject, encode_photos, subject_labels
from mipadapter.testing.mip import tiny_mip_pipeline


def run(mip, prompt, subjects, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return mip(
        prompt, subjects, output_type="np", generator=torch.Generator().manual_seed(0), show_progress=False, **kwargs
    )


@pytest.fixture(scope="module")
def mip():
    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


# ----------------------------------------------------------------------------------------- warnings


def test_a_starved_subject_is_warned_about_by_index(mip, photo, caplog):
    """A one-cell region (replace) leaves the dog a sliver of the routing: one warning, at index 0."""
    subjects = [Subject("dog", photo(1), region=(0, 0, 8, 8)), Subject("cat", photo(2))]
    with caplog.at_level("WARNING", logger="mipadapter.pipeline.core"):
        out = run(mip, "a dog and a cat", subjects)
    assert [(w.subject, w.index, w.kind) for w in out.warnings] == [("dog", 0, "starved")]
    assert "raise its scale, give it a region" in out.warnings[0].message
    assert "'dog' was routed" in caplog.text


def test_balanced_subjects_give_no_warning_and_the_check_can_be_turned_off(mip, photo):
    halves = [Subject("dog", photo(1), region=(0, 0, 32, 64)), Subject("cat", photo(2), region=(32, 0, 64, 64))]
    assert run(mip, "a dog and a cat", halves).warnings == []
    starved = [Subject("dog", photo(1), region=(0, 0, 8, 8)), Subject("cat", photo(2))]
    assert run(mip, "a dog and a cat", starved, starved_share=None).warnings == []


def test_names_outside_the_prompt_fail_fast_unless_allowed(mip, photo):
    subjects = [Subject("dog", photo(1)), Subject("teapot", photo(2))]
    with pytest.raises(SubjectAlignmentError, match="'teapot' does not occur in the prompt"):
        run(mip, "a photo of a dog at dawn", subjects)
    out = run(mip, "a photo of a dog at dawn", subjects, require_names_in_prompt=False, starved_share=None)
    assert [(w.subject, w.index, w.kind) for w in out.warnings] == [("teapot", 1, "not_named")]
    with pytest.raises(SubjectAlignmentError, match="'dog' does not occur"):  # named ones still checked
        run(mip, "a photo at dawn", [Subject("dog", photo(1))], require_names_in_prompt=True)


def test_a_repeated_name_takes_its_own_mention_and_a_label(mip, photo):
    subjects = [Subject("dog", photo(1)), Subject("dog", photo(2))]
    out = run(mip, "a dog and a dog", subjects, return_relevance=True)
    assert set(out.relevance[0]) == {"dog", "dog#2"} == set(out.settings["scales"])
    assert subject_labels(["a", "b", "a", "a"]) == ["a", "b", "a#2", "a#3"]
    with pytest.raises(SubjectAlignmentError, match="claim the same prompt tokens"):
        run(mip, "a dog and a cat", subjects)


# ----------------------------------------------------------------------------------------- settings


def test_settings_record_what_the_call_resolved(mip, photo):
    subjects = [Subject("dog", photo(1), scale=0.4), Subject("cat", photo(2))]
    out = run(mip, "a dog and a cat", subjects, height=64, width=96, num_images_per_prompt=2)
    assert out.settings == {
        "prompt": "a dog and a cat",
        "negative_prompt": None,  # the constructor was given none
        "negative_image": "zeros",  # IP-Adapter's unconditional input, the UNet default
        "guidance_scale": 5.0,  # SDXL's default, resolved
        "num_inference_steps": 2,
        "height": 64,
        "width": 96,
        "num_images_per_prompt": 2,
        "rule": "official",
        "use_text_weight": True,
        "multi_image": "mean",
        "region_mode": None,
        "names": ["dog", "cat"],
        "scales": {"dog": pytest.approx(0.4), "cat": pytest.approx(mip.adapter.config.default_scale)},
        "scheduler": type(mip.pipe.scheduler).__name__,
    }
    assert out.images.shape == (2, 64, 96, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": 0}, "num_inference_steps must be an integer ≥ 1, got 0"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be a finite number ≥ 0"),
        ({"height": 60}, "height must be a positive multiple of 8"),
        ({"width": -64}, "width must be a positive multiple of 8"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be an integer ≥ 1"),
    ],
)
def test_bad_numbers_are_refused_before_any_model_runs(mip, photo, kwargs, message):
    calls = []
    hook = mip.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            run(mip, "a dog", [Subject("dog", photo(1))], **kwargs)
    finally:
        hook.remove()
    assert calls == []


# ----------------------------------------------------------------------------------------- negative prompt


def test_the_default_negative_prompt_reaches_the_unet_and_empty_turns_it_off(photo):
    mip = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    mip = MIPAdapterPipeline(mip.unload(), mip.adapter, mip.image_encoder, mip.feature_extractor,
                             negative_prompt=AUTHORS_NEGATIVE_PROMPT)  # fmt: skip
    seen = []
    hook = mip.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"][0].clone()), with_kwargs=True
    )
    prompt = "a dog"
    try:
        out = run(mip, prompt, [Subject("dog", photo(1))], num_inference_steps=1)
        off = run(mip, prompt, [Subject("dog", photo(1))], num_inference_steps=1, negative_prompt="")
    finally:
        hook.remove()
    assert out.settings["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT and off.settings["negative_prompt"] is None
    _, negative, _, _ = mip.pipe.encode_prompt(
        prompt=prompt, negative_prompt=AUTHORS_NEGATIVE_PROMPT, device="cpu", num_images_per_prompt=1
    )
    torch.testing.assert_close(seen[0], negative[0])  # the unconditional row is the authors' string
    assert torch.count_nonzero(seen[1]) == 0  # no negative prompt: SDXL zeroes the unconditional row


# ----------------------------------------------------------------------------------------- other pipelines


def _wrapped(kind: str):
    """A MIPAdapterPipeline around an SDXL img2img / inpainting / ControlNet pipeline of tiny models."""
    from diffusers import (
        ControlNetModel,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
    )

    tiny = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    base = tiny.unload()
    if kind == "img2img":
        pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(base)
    elif kind == "inpaint":
        pipe = StableDiffusionXLInpaintPipeline.from_pipe(base)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            controlnet = ControlNetModel.from_unet(base.unet).eval()
        pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet)
    return MIPAdapterPipeline(pipe, tiny.adapter, tiny.image_encoder, tiny.feature_extractor)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "controlnet"])
def test_other_pipelines_run_at_a_non_default_size(kind, photo):
    """96×64 init / control images (img2img and ControlNet take their size from the image, inpainting
    from height and width): the latent grid comes from the latents the UNet receives."""
    mip = _wrapped(kind)
    image = photo(5, size=(96, 64))
    extra = {"image": image}
    if kind == "inpaint":
        extra.update(mask_image=Image.new("L", (96, 64), 255), height=64, width=96)
    if kind == "img2img":
        extra["strength"] = 0.9
    subjects = [Subject("dog", photo(1), region=(0, 0, 48, 64)), Subject("cat", photo(2))]
    out = run(mip, "a dog and a cat", subjects, num_inference_steps=3, return_relevance=True, **extra)
    assert out.images.shape == (1, 64, 96, 3)
    assert out.relevance[0]["dog"].shape == (64, 96)
    assert (out.settings["height"], out.settings["width"]) == (64, 96)
    dog = out.relevance[0]["dog"]
    assert dog[:, :40].mean() > 10 * dog[:, 56:].mean()  # the box replaced the dog's map


def test_a_box_outside_the_known_size_is_refused_before_generating(mip, photo):
    calls = []
    hook = mip.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"box \(0, 0, 80, 64\) must satisfy"):
            run(mip, "a dog", [Subject("dog", photo(1), region=(0, 0, 80, 64))])
    finally:
        hook.remove()
    assert calls == []


# ----------------------------------------------------------------------------------------- photos


@pytest.mark.parametrize("orientation, turn", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_tagged_and_physically_rotated_photos_encode_alike(mip, photo, tmp_path, orientation, turn):
    stored = photo(7, size=(48, 32))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    stored.save(tmp_path / "phone.png", exif=exif)
    with Image.open(tmp_path / "phone.png") as tagged:
        tagged.load()
        features = encode_photos(mip.image_encoder, mip.feature_extractor, [tagged], False)
    rotated = encode_photos(mip.image_encoder, mip.feature_extractor, [stored.transpose(turn)], False)
    unturned = encode_photos(mip.image_encoder, mip.feature_extractor, [stored], False)
    torch.testing.assert_close(features, rotated)
    assert not torch.allclose(features, unturned, atol=1e-4)


# ----------------------------------------------------------------------------------------- image attention


def test_image_attention_maps_are_per_subject_and_cost_nothing_when_off(mip, photo):
    subjects = [Subject("dog", [photo(1), photo(3)]), Subject("cat", photo(2))]
    out = run(mip, "a dog and a cat", subjects, return_image_attention=True, multi_image="each")
    assert set(out.image_attention[0]) == {"dog", "cat"}
    for label, array in out.image_attention[0].items():
        assert array.shape == (64, 64) and 0 <= array.min() and 0.99 < array.max() <= 1.0, label  # bilinear upsampling
    assert not np.allclose(out.image_attention[0]["dog"], out.image_attention[0]["cat"])
    plain = run(mip, "a dog and a cat", subjects, multi_image="each")
    assert plain.image_attention is None
    np.testing.assert_array_equal(plain.images, out.images)  # recording does not change the result


def test_the_call_leaves_no_hook_behind(mip, photo):
    hooks = dict(mip.pipe.unet._forward_pre_hooks)
    run(mip, "a dog", [Subject("dog", photo(1))])
    assert dict(mip.pipe.unet._forward_pre_hooks) == hooks
    with pytest.raises(ValueError, match=CROSS_ATTENTION_KWARG):
        run(mip, "a dog", [Subject("dog", photo(1))], cross_attention_kwargs={CROSS_ATTENTION_KWARG: 1})
