"""Several named adapters in one ``MIPAdapterPipeline`` (issue 21): diffusers' multi-adapter parity, the
single-adapter path kept bit for bit, routing across adapters of different encoders, and the refusals.

A second IP-Adapter-Plus file with other weights stands in for ``plus-face`` (same encoder as ``plus``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_pipeline import BUILDERS, GUIDANCE, SPECS, generate, plain, rel
from transformers import CLIPVisionModelWithProjection

from mipadapter.checkpoint import load_adapter
from mipadapter.pipeline import MIPAdapterPipeline, Subject
from mipadapter.testing.checkpoints import fabricate_ip_adapter_state, save_checkpoint

PROMPT = "a cat and a dog on a sofa"
FACE_NAMES = {"sdxl": "ip-adapter-plus-face_sdxl_vit-h.bin", "sd15": "ip-adapter-plus-face_sd15.bin"}


@pytest.fixture(scope="module")
def face_files(tmp_path_factory):
    """``face_files(arch)`` → a plus-face stand-in: a Plus file of other weights (seed 77), float16 as h94's."""
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"face_{arch}")
            state = fabricate_ip_adapter_state(
                BUILDERS[arch]().unet, SPECS[arch].plus_image_encoder.hidden_size, "plus", seed=77
            )
            cache[arch] = save_checkpoint(state, folder / FACE_NAMES[arch], dtype=torch.float16)
        return cache[arch]

    return get


def encoder_of(files, kind: str, arch: str):
    """(encoder loaded from the checkpoint set's folder, the tiny spec's processor) for ``kind``."""
    folder = files.plus_image_encoder if kind == "plus" else files.basic_image_encoder
    spec = SPECS[arch].plus_image_encoder if kind == "plus" else SPECS[arch].basic_image_encoder
    return CLIPVisionModelWithProjection.from_pretrained(folder), spec.build()[1]


def single(arch: str, path, encoder, processor) -> MIPAdapterPipeline:
    pipe = BUILDERS[arch]()
    return MIPAdapterPipeline(pipe, load_adapter(path, pipe.unet), encoder, processor)


def plus_and_face(arch: str, files, face: Path, encoder, processor) -> MIPAdapterPipeline:
    """The default adapter is ``plus``; ``face`` is added with the same (given) encoder."""
    return single(arch, files.plus_bin, encoder, processor).add_adapter("face", face, image_encoder=encoder)


def count_unet_calls(mip: MIPAdapterPipeline) -> list[int]:
    calls = [0]
    mip.pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


# ----------------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_two_adapters_one_subject_each_uniform_equals_diffusers_multi_adapter(arch, checkpoint_files, face_files, photo):
    """diffusers ``load_ip_adapter([plus, face])`` + ``set_ip_adapter_scale([s1, s2])`` +
    ``ip_adapter_image=[[a], [b]]`` adds each adapter's term everywhere: our ``uniform`` with the cat on
    plus and the dog on face."""
    files, face = checkpoint_files(arch), face_files(arch)
    encoder, processor = encoder_of(files, "plus", arch)
    a, b = photo(1), photo(2, size=(50, 36))

    theirs = BUILDERS[arch]()
    theirs.feature_extractor, theirs.image_encoder = processor, encoder  # one encoder for both, as ours
    plus = files.load_ip_adapter_kwargs("plus_bin")
    theirs.load_ip_adapter(
        [plus["pretrained_model_name_or_path_or_dict"], str(face.parent)],
        subfolder=[plus["subfolder"], ""],
        weight_name=[plus["weight_name"], face.name],
        image_encoder_folder=None,
    )
    theirs.set_ip_adapter_scale([0.7, 1.3])
    expected = plain(theirs, arch, PROMPT, ip_adapter_image=[[a], [b]])

    mip = plus_and_face(arch, files, face, encoder, processor)
    assert mip.adapter_names == ["default", "face"]
    subjects = [Subject("cat", images=[a], scale=0.7), Subject("dog", images=[b], scale=1.3, adapter="face")]
    got = generate(mip, subjects, PROMPT, rule="uniform", guidance_scale=GUIDANCE[arch])
    assert got.images.shape == expected.shape == (1, 64, 64, 3)
    assert rel(got.images, expected) <= 1e-5
    assert got.settings["adapters"] == {"cat": "default", "dog": "face"}
    # the comparison can fail: each photo through the other adapter is a clearly different image
    swapped = [Subject("cat", images=[a], scale=0.7, adapter="face"), Subject("dog", images=[b], scale=1.3)]
    assert rel(generate(mip, swapped, PROMPT, rule="uniform", guidance_scale=GUIDANCE[arch]).images, expected) > 1e-3


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize("rule", ["uniform", "paper"])
def test_one_adapter_of_the_mix_alone_is_the_single_adapter_pipeline_bit_for_bit(
    arch, rule, checkpoint_files, face_files, photo
):
    """Every subject on the added adapter equals a pipeline built with that adapter alone, and every
    subject on the default equals the pipeline without the added one: np.array_equal, not a tolerance."""
    files, face = checkpoint_files(arch), face_files(arch)
    encoder, processor = encoder_of(files, "plus", arch)
    mip = plus_and_face(arch, files, face, encoder, processor)
    photos = {"cat": [photo(1)], "dog": [photo(2), photo(3)]}
    scales = {"cat": 0.8, "dog": 1.1}

    def subjects(adapter):
        return [Subject(name, images=photos[name], scale=scales[name], adapter=adapter) for name in photos]

    kwargs = dict(rule=rule, multi_image="each")
    on_face = generate(mip, subjects("face"), PROMPT, **kwargs).images
    on_default = generate(mip, subjects(None), PROMPT, **kwargs).images
    face_alone = generate(single(arch, face, encoder, processor), subjects(None), PROMPT, **kwargs).images
    plus_alone = generate(single(arch, files.plus_bin, encoder, processor), subjects(None), PROMPT, **kwargs).images
    assert np.array_equal(on_face, face_alone)
    assert np.array_equal(on_default, plus_alone)
    assert rel(on_face, on_default) > 1e-3  # the two adapters really differ


# ----------------------------------------------------------------------------------------- routing


def general_and_face(files, face: Path, face_first: bool) -> MIPAdapterPipeline:
    """SDXL with a general basic adapter (4 tokens, bigG stand-in) and the face Plus one (16 tokens, ViT-H
    stand-in): the face one the default and the general one added, or the other way round."""
    basic = (files.basic_bin, *encoder_of(files, "basic", "sdxl"))
    plus = (face, *encoder_of(files, "plus", "sdxl"))
    (first, first_name), (second, second_name) = ((plus, "face"), (basic, "general"))[:: 1 if face_first else -1]
    path, encoder, processor = second
    mip = single("sdxl", *first).add_adapter(second_name, path, image_encoder=encoder, feature_extractor=processor)
    return mip, first_name


def test_a_box_on_the_face_subject_and_a_general_subject_route_together(checkpoint_files, face_files, photo):
    """The cat (face adapter) boxed in the left 24 px, the dog (general adapter) free: the cat's map is 0
    outside its box (and the bilinear reach of the recorder's upsampling). Then the subjects' order and the adapters' order (which one is the default) are
    permuted: the images move by 1e-6 at most (relative error). It runs in float64, where summation-order
    rounding is ~1e-15 (the images agree exactly here; float32 moved them 9e-7, too close to the bound)."""
    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    images = {}
    for face_first in (False, True):
        mip, default = general_and_face(files, face, face_first)
        mip.to(torch.float64)

        def adapter(name, default=default):
            return None if name == default else name

        cat = Subject("cat", images=[photo(1)], scale=1.2, region=(0, 0, 24, 64), adapter=adapter("face"))
        dog = Subject("dog", images=[photo(2)], scale=0.9, adapter=adapter("general"))
        for order, subjects in (("cat, dog", [cat, dog]), ("dog, cat", [dog, cat])):
            out = generate(mip, subjects, PROMPT, rule="paper", return_relevance=True)
            maps = out.relevance[0]
            # 0 past the box's reach once the recorder upsamples its coarsest (4x4, 16 px a cell) grid
            assert maps["cat"][:, 48:].max() == 0.0
            assert maps["cat"][:, :16].min() > 0.5 and maps["dog"][:, 40:].max() > 0.1
            images[face_first, order] = out.images
    first = images[False, "cat, dog"]
    for (face_first, order), other in images.items():
        assert rel(other, first) <= 1e-6, (face_first, order)
    # which adapter is the default changes nothing at all; the subjects' order moves the image by float
    # rounding only (as much as it does with both subjects on one adapter)
    assert np.array_equal(images[True, "cat, dog"], first) and np.array_equal(images[True, "dog, cat"], images[False, "dog, cat"])
    # the comparison can fail: the box really steers the cat
    mip, default = general_and_face(files, face, False)
    mip.to(torch.float64)
    free = generate(mip, [Subject("cat", images=[photo(1)], scale=1.2, adapter="face"),
                          Subject("dog", images=[photo(2)], scale=0.9)], PROMPT, rule="paper").images  # fmt: skip
    assert rel(free, first) > 1e-3


# ----------------------------------------------------------------------------------------- refusals


def test_official_with_an_adapter_lacking_a_text_weight_names_the_subject(checkpoint_files, face_files, photo):
    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    encoder, processor = encoder_of(files, "plus", "sdxl")
    mip = single("sdxl", files.mip_plus_bin, encoder, processor).add_adapter("face", face, image_encoder=encoder)
    calls = count_unet_calls(mip)
    subjects = [Subject("cat", images=[photo(1)]), Subject("dog", images=[photo(2)], adapter="face")]
    message = (
        r"^rule 'official' weighs each subject by its adapter's text weight, which the adapter of 'dog' has "
        r"not: use rule 'paper' or 'uniform'$"
    )
    with pytest.raises(ValueError, match=message):
        generate(mip, subjects, PROMPT, rule="official")
    assert calls[0] == 0  # refused before the model ran
    # without a rule a mix lacking a text weight runs paper; both on the MIP adapter, official stays its default
    assert generate(mip, subjects, PROMPT).settings["rule"] == "paper"
    assert generate(mip, [subjects[0]], PROMPT).settings["rule"] == "official"


def test_an_unknown_adapter_name_is_refused_before_the_model_runs(checkpoint_files, face_files, photo):
    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    mip = plus_and_face("sdxl", files, face, *encoder_of(files, "plus", "sdxl"))
    calls = count_unet_calls(mip)
    subjects = [Subject("cat", images=[photo(1)]), Subject("dog", images=[photo(2)], adapter="fase")]
    with pytest.raises(ValueError, match=r"^subject 'dog': no adapter named 'fase'; this pipeline has 'default', 'face'$"):
        generate(mip, subjects, PROMPT)
    assert calls[0] == 0


def test_add_adapter_refusals_are_one_line_and_leave_the_pipeline_as_it_was(checkpoint_files, face_files):
    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    encoder, processor = encoder_of(files, "plus", "sdxl")
    mip = plus_and_face("sdxl", files, face, encoder, processor)
    refusals = [
        (dict(name="face", adapter=face), r"^this pipeline has an adapter named 'face' already$"),
        (dict(name="default", adapter=face), r"^this pipeline has an adapter named 'default' already$"),
        (dict(name="my face", adapter=face), r"^an adapter name is letters, digits, '_', '-' or '\.' .*got 'my face'$"),
        (dict(name="a=b", adapter=face), r"got 'a=b'$"),
        (dict(name="", adapter=face), r"got ''$"),
        (dict(name="other"), r"^adapter 'other': give an adapter file \(or a preset\)$"),
        (dict(name="other", adapter=face, preset="ip-sdxl-nope"), r"^unknown preset 'ip-sdxl-nope'"),
        (  # a loaded adapter keeps its config's scale: a default_scale would be silently lost
            dict(name="other", adapter=mip.adapters["face"], default_scale=0.5),
            r"^adapter 'other': default_scale is for an adapter file; a loaded adapter keeps its config's \(1\)$",
        ),
        (  # an SD1.5 adapter into an SDXL pipeline: named, with the base model it fits
            dict(name="sd15", adapter=checkpoint_files("sd15").plus_bin),
            r"^.*ip-adapter-plus_sd15\.bin: adapter tokens are 48 wide but the model's attention layers take \[96\]: "
            r"this adapter belongs to another base model$",
        ),
        (  # the bigG stand-in's hidden states are 56 wide, the Plus adapter takes 48
            dict(name="other", adapter=face, image_encoder=str(files.basic_image_encoder)),
            r"^image encoder of adapter 'other' '.*image_encoder' has hidden size 56, but the plus adapter takes "
            r"48-wide features: use the image encoder the adapter was trained with$",
        ),
        (
            dict(name="other", adapter=face, image_encoder=CLIPVisionModelWithProjection.from_pretrained(files.basic_image_encoder)),
            r"^the image encoder given for adapter 'other' does not give the features it takes$",
        ),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message) as error:
            mip.add_adapter(**kwargs)
        assert "\n" not in str(error.value), kwargs
        assert mip.adapter_names == ["default", "face"], kwargs


def test_an_adapter_whose_encoder_no_loaded_one_fits_needs_one_named(checkpoint_files):
    """A basic SDXL pipeline (bigG stand-in) given a Plus adapter (ViT-H features) and no encoder."""
    files = checkpoint_files("sdxl")
    mip = single("sdxl", files.basic_bin, *encoder_of(files, "basic", "sdxl"))
    message = r"^adapter 'face' takes 48-wide image hidden states, which no loaded image encoder gives: give its image_encoder$"
    with pytest.raises(ValueError, match=message):
        mip.add_adapter("face", files.plus_bin)
    assert mip.adapter_names == ["default"]


def test_flux_refuses_added_adapters():
    from mipadapter.testing.mip import tiny_mip_pipeline

    mip = tiny_mip_pipeline("flux")
    with pytest.raises(ValueError, match=r"^adding adapters is for SDXL and SD1\.5 pipelines: FLUX has one adapter kind"):
        mip.add_adapter("face", "unused.safetensors")
    assert mip.adapter_names == ["default"]


def test_an_encoder_folder_is_loaded_once_for_the_adapters_that_share_it(checkpoint_files, face_files, photo):
    """plus and plus-face added with the same encoder folder share one encoder object; the default's
    (another encoder) stays apart, and each subject goes through its own adapter's encoder."""
    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    basic_encoder, basic_processor = encoder_of(files, "basic", "sdxl")
    mip = single("sdxl", files.basic_bin, basic_encoder, basic_processor)
    folder = str(files.plus_image_encoder)
    mip.add_adapter("plus", files.plus_bin, image_encoder=folder).add_adapter("face", face, image_encoder=folder)
    mip.add_adapter("face2", face)  # no encoder named: the first loaded one that fits
    encoders = {name: mip._adapters.encoder(name)[0] for name in mip.adapter_names}
    assert encoders["plus"] is encoders["face"] is encoders["face2"]
    assert encoders["default"] is basic_encoder and encoders["plus"] is not basic_encoder
    distinct = {id(module) for module in mip._adapters.modules()}
    assert len(distinct) == 4 + 2  # four adapters, two encoders
    cat = Subject("cat", images=[photo(1)], adapter="face")
    features = mip.encode_subject_features(cat)
    assert features.shape[-1] == SPECS["sdxl"].plus_image_encoder.hidden_size  # ViT-H hidden states


@pytest.mark.parametrize("names", [("face", "face"), ("face", None)])
def test_a_built_conditioning_is_prepared_with_the_adapters_that_projected_it(names, checkpoint_files, face_files, photo):
    """``build_conditioning`` records which adapters projected the photos (``cond.sources``), so
    ``pipe.adapter.prepare(cond)`` takes each condition's image keys from them: with every subject on the
    added adapter, the face adapter's keys, not the default's (before the fix: the default's, silently);
    sources other than those recorded are refused."""
    from mipadapter.config import MergeRule, MultiImageMode

    files, face = checkpoint_files("sdxl"), face_files("sdxl")
    encoder, processor = encoder_of(files, "plus", "sdxl")
    mip = plus_and_face("sdxl", files, face, encoder, processor)
    subjects = [Subject(name, images=[photo(k + 1)], adapter=a) for k, (name, a) in enumerate(zip(("cat", "dog"), names, strict=True))]
    kwargs = dict(
        prompt_rows=1, subjects=subjects, cfg=True, rule=MergeRule.PAPER, use_text_weight=False,
        multi_image=MultiImageMode.MEAN, image_size=(64, 64),
    )  # fmt: skip
    used = [mip.adapters[name or "default"] for name in dict.fromkeys(names)]
    recorded = mip.adapter.prepare(mip.build_conditioning(**kwargs))
    assert list(recorded.sources) == used
    explicit = mip.adapter.prepare(mip.build_conditioning(**kwargs), used)
    unrecorded = mip.build_conditioning(**kwargs)
    unrecorded.sources = ()
    layer = mip.adapter.layer_specs[0].name
    torch.testing.assert_close(recorded.layer_inputs[layer].ip_keys, explicit.layer_inputs[layer].ip_keys, rtol=0, atol=0)
    if len(used) == 1:  # read as the default adapter's tokens, the face tokens meet the default's keys
        own = mip.adapter.prepare(unrecorded).layer_inputs[layer].ip_keys
        assert not torch.allclose(own, recorded.layer_inputs[layer].ip_keys)
    with pytest.raises(ValueError) as error:
        mip.adapter.prepare(mip.build_conditioning(**kwargs), [mip.adapter] * len(used))
    assert str(error.value) == (
        "the conditioning's image tokens were projected by other adapters than the sources given: "
        "leave sources out to use those it records"
    )
