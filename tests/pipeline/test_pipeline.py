"""``MIPAdapterPipeline`` end to end on tiny models: references, invariants, defaults and bad inputs.

Every pipeline that gets an adapter is built fresh (attaching changes its UNet); only checkpoint files
are shared. Images are compared as float arrays (``output_type="np"``) by relative error.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mipadapter.alignment import SubjectAlignmentError
from mipadapter.checkpoint import load_adapter
from mipadapter.config import MergeRule, MultiImageMode
from mipadapter.modeling import MIPAttnProcessor
from mipadapter.pipeline import MIPAdapterPipeline, Subject, encode_names, encode_photos, unconditional_names
from mipadapter.testing import TINY_SD15, TINY_SDXL, tiny_sd15_pipeline, tiny_sdxl_pipeline
from mipadapter.testing.mip import tiny_mip_pipeline

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd15": tiny_sd15_pipeline}
SPECS = {"sdxl": TINY_SDXL, "sd15": TINY_SD15}
GUIDANCE = {"sdxl": 5.0, "sd15": 7.5}  # the diffusers defaults, which ours follows
PROMPT = "a cat and a dog beside a wooden pot"


@pytest.fixture(scope="module")
def mip_pipelines():
    """``mip_pipelines(arch, projection="basic", text_weight=True)`` → a shared MIP pipeline.

    Generation calls leave a pipeline as it was (all per-call state lives in the call's conditioning;
    ``test_shared_pipelines_are_left_as_they_were`` checks it, last), so tests that only call may share one. Tests that
    change weights or config build their own.
    """
    cache = {}

    def get(arch: str, projection: str = "basic", text_weight: bool = True):
        key = (arch, projection, text_weight)
        if key not in cache:
            cache[key] = tiny_mip_pipeline(arch, projection, text_weight=text_weight)
        return cache[key]

    get.cache = cache
    return get


@pytest.fixture(scope="module")
def plain_images():
    """``plain_images(arch, height=64, width=64)`` → the stock pipeline's image for PROMPT, seed 0."""
    cache = {}

    def get(arch: str, height: int = 64, width: int = 64):
        if (arch, height, width) not in cache:
            cache[arch, height, width] = plain(BUILDERS[arch](seed=0), arch, height=height, width=width)
        return cache[arch, height, width]

    return get


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def generate(mip: MIPAdapterPipeline, subjects, prompt: str = PROMPT, seed: int = 0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    return mip(
        prompt,
        subjects,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        show_progress=False,
        **kwargs,
    )


def plain(pipe, arch: str, prompt: str = PROMPT, seed: int = 0, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("num_inference_steps", 2)
    return pipe(
        prompt=prompt,
        guidance_scale=GUIDANCE[arch],
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


def strong_gate(mip: MIPAdapterPipeline) -> MIPAdapterPipeline:
    """The fabricated text weights are tiny (std 0.02, g ≈ 1): scale them so the gate visibly acts."""
    with torch.no_grad():
        for processor in mip.adapter.processors().values():
            processor.text_to_weight.weight.mul_(100)
    return mip


def three_subjects(photo, scales=(0.6, 0.9, 1.2), **extra):
    return [
        Subject("cat", images=[photo(1)], scale=scales[0], **extra.get("cat", {})),
        Subject("dog", images=[photo(2)], scale=scales[1], **extra.get("dog", {})),
        Subject("wooden pot", images=[photo(3)], scale=scales[2], **extra.get("wooden pot", {})),
    ]


# ----------------------------------------------------------------------------------------- diffusers parity


@pytest.mark.parametrize(
    "arch, name",
    [
        ("sdxl", "basic_bin"),
        ("sdxl", "plus_bin"),
        ("sdxl", "mip_basic_bin"),  # diffusers ignores text_to_weight; uniform without it is the same model
        ("sd15", "basic_bin"),
        ("sd15", "plus_bin"),
    ],
)
def test_one_subject_uniform_equals_diffusers_ip_adapter(arch, name, checkpoint_files, photo):
    files = checkpoint_files(arch)
    spec = SPECS[arch]
    _, processor = (spec.plus_image_encoder if "plus" in name else spec.basic_image_encoder).build()
    reference = photo(7, size=(50, 36))

    theirs = BUILDERS[arch]()
    theirs.feature_extractor = processor  # the same preprocessing on both sides
    theirs.load_ip_adapter(**files.load_ip_adapter_kwargs(name))
    theirs.set_ip_adapter_scale(0.7)
    expected = plain(theirs, arch, "a photo of a cat", ip_adapter_image=reference, height=64, width=64)

    pipe = BUILDERS[arch]()
    mip = MIPAdapterPipeline(
        pipe, load_adapter(getattr(files, name), pipe.unet), theirs.image_encoder, processor
    )
    got = generate(
        mip, [Subject("cat", images=[reference], scale=0.7)], "a photo of a cat",
        rule="uniform", use_text_weight=False, guidance_scale=GUIDANCE[arch], height=64, width=64,
    ).images  # fmt: skip
    assert got.shape == expected.shape == (1, 64, 64, 3)
    assert rel(got, expected) <= 1e-5
    # the comparison can fail: another scale gives a clearly different image
    other = generate(
        mip, [Subject("cat", images=[reference], scale=0.3)], "a photo of a cat",
        rule="uniform", use_text_weight=False, guidance_scale=GUIDANCE[arch],
    ).images  # fmt: skip
    assert rel(other, expected) > 1e-3


def test_without_cfg_uniform_equals_diffusers_ip_adapter(checkpoint_files, photo):
    """guidance_scale 1: one batch row per image, no unconditional half, still diffusers' output."""
    files = checkpoint_files("sdxl")
    _, processor = TINY_SDXL.plus_image_encoder.build()
    reference = photo(8)
    theirs = tiny_sdxl_pipeline()
    theirs.feature_extractor = processor
    theirs.load_ip_adapter(**files.load_ip_adapter_kwargs("plus_bin"))
    theirs.set_ip_adapter_scale(1.3)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(
        prompt="a photo of a cat", ip_adapter_image=reference, guidance_scale=1.0, num_inference_steps=2,
        num_images_per_prompt=2, output_type="np", generator=torch.Generator().manual_seed(3),
    ).images  # fmt: skip
    pipe = tiny_sdxl_pipeline()
    mip = MIPAdapterPipeline(pipe, load_adapter(files.plus_bin, pipe.unet), theirs.image_encoder, processor)
    got = generate(
        mip, [Subject("cat", images=[reference], scale=1.3)], "a photo of a cat", seed=3,
        rule="uniform", guidance_scale=1.0, num_images_per_prompt=2,
    ).images  # fmt: skip
    assert got.shape == (2, 64, 64, 3)
    assert rel(got, expected) <= 1e-5


# ----------------------------------------------------------------------------------------- scale 0


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
@pytest.mark.parametrize(
    "rule, text_weight",
    [("uniform", False), ("uniform", True), ("official", True), ("official", False), ("paper", False)],
)
def test_scale_zero_is_the_plain_pipeline(arch, rule, text_weight, photo, mip_pipelines, plain_images):
    mip = mip_pipelines(arch)
    expected = plain_images(arch)
    got = generate(
        mip, three_subjects(photo, scales=(0.0, 0.0, 0.0)), rule=rule, use_text_weight=text_weight
    ).images
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (
        rel(generate(mip, three_subjects(photo), rule=rule, use_text_weight=text_weight).images, expected)
        > 1e-3
    )


def test_paper_with_text_weight_scales_text_even_at_scale_zero(photo, plain_images):
    """Not an invariant: paper's gate multiplies Z_text itself, so scale 0 is not the plain pipeline."""
    mip = strong_gate(tiny_mip_pipeline("sdxl", "basic", text_weight=True))
    expected = plain_images("sdxl")
    got = generate(
        mip, three_subjects(photo, scales=(0.0, 0.0, 0.0)), rule="paper", use_text_weight=True
    ).images
    assert rel(got, expected) > 1e-4


@pytest.mark.parametrize("size", [(64, 96), (40, 56)])
def test_scale_zero_is_plain_at_non_square_and_odd_sizes(size, photo, mip_pipelines, plain_images):
    """40x56 is a 5x7 latent: the UNet's grids are 5x7 and 3x4 (rounded up), regions included."""
    height, width = size
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo, scales=(0.0, 0.0, 0.0), cat={"region": (0, 0, width // 2, height)})
    got = generate(mip, subjects, rule="official", height=height, width=width).images
    assert got.shape == (1, height, width, 3)
    np.testing.assert_allclose(got, plain_images("sdxl", height, width), rtol=0, atol=1e-6)


def test_unload_gives_back_the_plain_pipeline(photo, plain_images):
    mip = tiny_mip_pipeline("sd15", "plus", text_weight=True)
    generate(mip, three_subjects(photo))
    pipe = mip.unload()
    assert not any(isinstance(p, MIPAttnProcessor) for p in pipe.unet.attn_processors.values())
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    np.testing.assert_array_equal(plain(pipe, "sd15"), plain_images("sd15"))


# ----------------------------------------------------------------------------------------- permutations


@pytest.mark.parametrize(
    "rule, text_weight, multi_image, region",
    [
        ("uniform", False, "mean", False),
        ("paper", False, "mean", False),
        ("paper", True, "mean", False),
        ("official", True, "mean", False),
        ("official", False, "each", False),
        ("official", True, "mean", True),
        ("paper", True, "each", True),
    ],
)
def test_permuting_subjects_changes_nothing(rule, text_weight, multi_image, region, photo, mip_pipelines):
    mip = mip_pipelines("sdxl")
    extra = {"dog": {"region": (0, 0, 40, 64)}} if region else {}
    subjects = three_subjects(photo, **extra)
    subjects[1].images = (photo(2), photo(4))  # two photos for the dog
    kwargs = dict(rule=rule, use_text_weight=text_weight, multi_image=multi_image)
    first = generate(mip, subjects, **kwargs).images
    for order in ([2, 0, 1], [1, 2, 0]):
        again = generate(mip, [subjects[i] for i in order], **kwargs).images
        assert rel(again, first) <= 1e-5


@pytest.mark.parametrize("rule", ["paper", "official"])
def test_routing_reads_the_names(rule, photo, mip_pipelines):
    """Swapping the names (photos stay) moves the references: routing really follows the names."""
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo, scales=(1.0, 1.0, 1.0))
    first = generate(mip, subjects, rule=rule).images
    subjects[0].name, subjects[1].name = "dog", "cat"
    assert rel(generate(mip, subjects, rule=rule).images, first) > 1e-4


def test_uniform_ignores_the_names(photo, mip_pipelines):
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo, scales=(1.0, 1.0, 1.0))
    first = generate(mip, subjects, rule="uniform").images
    subjects[0].name, subjects[1].name = "dog", "cat"
    assert rel(generate(mip, subjects, rule="uniform").images, first) <= 1e-5


# ----------------------------------------------------------------------------------------- photos & embeds


@pytest.mark.parametrize("projection", ["basic", "plus"])
def test_precomputed_image_embeds_equal_photos(projection, photo, mip_pipelines):
    mip = mip_pipelines("sd15", projection)
    subjects = three_subjects(photo)
    subjects[2].images = (photo(3), photo(5))
    expected = generate(mip, subjects).images
    hidden = projection == "plus"
    embedded = []
    for index, subject in enumerate(subjects):
        features = encode_photos(mip.image_encoder, mip.feature_extractor, subject.images, hidden)
        if index == 0:  # a single photo's features may drop the photo axis
            features = features[0]
        embedded.append(Subject(subject.name, image_embeds=features, scale=subject.scale))
    np.testing.assert_allclose(generate(mip, embedded).images, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rule", ["uniform", "paper", "official"])
def test_each_with_one_photo_per_subject_equals_mean(rule, photo, mip_pipelines):
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo)
    mean = generate(mip, subjects, rule=rule, multi_image="mean").images
    each = generate(mip, subjects, rule=rule, multi_image="each").images
    np.testing.assert_allclose(each, mean, rtol=0, atol=1e-6)


def test_each_with_a_repeated_photo_equals_one_photo(photo, mip_pipelines):
    """k copies of a photo routed separately share the subject's weight 1/k each: the same image."""
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo)
    once = generate(mip, subjects, multi_image="each").images
    subjects[0].images = (photo(1),) * 3
    assert rel(generate(mip, subjects, multi_image="each").images, once) <= 1e-5
    subjects[0].images = (photo(1), photo(9))
    mean, each = (generate(mip, subjects, multi_image=mode).images for mode in ("mean", "each"))
    assert rel(each, mean) > 1e-5  # with distinct photos the two choices really differ


# ----------------------------------------------------------------------------------------- regions


@pytest.mark.parametrize("rule", ["uniform", "official"])
@pytest.mark.parametrize("mode", ["replace", "multiply"])
def test_a_whole_image_region_for_a_single_subject_changes_nothing(rule, mode, photo, mip_pipelines):
    """One subject: official's weight is A/A = 1 and uniform's is 1, whatever a positive region says."""
    mip = mip_pipelines("sdxl")
    bare = generate(mip, [Subject("cat", images=[photo(1)])], rule=rule).images
    boxed = generate(
        mip, [Subject("cat", images=[photo(1)], region=(0, 0, 64, 64), region_mode=mode)], rule=rule
    )
    assert rel(boxed.images, bare) <= 1e-5


def test_a_whole_image_region_under_paper_is_not_neutral(photo, mip_pipelines):
    """paper uses A/mean A, which a flat region replaces by 1: a real change (so not asserted equal)."""
    mip = mip_pipelines("sdxl", text_weight=False)
    bare = generate(mip, [Subject("cat", images=[photo(1)])], rule="paper").images
    boxed = generate(mip, [Subject("cat", images=[photo(1)], region=(0, 0, 64, 64))], rule="paper").images
    assert rel(boxed, bare) > 1e-5


def test_relevance_maps_shapes_and_region_orientation(photo, mip_pipelines):
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo, dog={"region": (0, 0, 40, 64)})  # the left 40 of 96 columns
    out = generate(mip, subjects, height=64, width=96, num_images_per_prompt=2, return_relevance=True)
    assert out.images.shape == (2, 64, 96, 3)
    assert len(out.relevance) == len(out.relevance_by_resolution) == 2
    for maps, by_grid in zip(out.relevance, out.relevance_by_resolution, strict=True):
        assert list(maps) == ["cat", "dog", "wooden pot"]
        for name, array in maps.items():
            assert array.shape == (64, 96) and array.dtype == np.float32
            assert 0 <= array.min() and 0.9 < array.max() <= 1  # peaks at 1 on the latent grid
            assert set(by_grid[name]) == {(8, 12), (4, 6)}  # the tiny UNet's two grids
            assert all(m.shape == (64, 96) for m in by_grid[name].values())
        dog = maps["dog"]
        assert dog[:, 64:].max() <= 1e-6 and dog[:, :24].min() > 0.5  # the box, not its transpose
    without = generate(mip, three_subjects(photo), height=64, width=96)
    assert without.relevance is None and without.relevance_by_resolution is None


# ----------------------------------------------------------------------------------------- batch


def test_num_images_per_prompt_rows_match_single_runs(photo, mip_pipelines):
    """Two images per prompt under CFG: each row equals the single-image run with its generator."""
    mip = mip_pipelines("sdxl", "plus")
    subjects = three_subjects(photo, cat={"region": (0, 0, 32, 64)})
    both = mip(
        PROMPT, subjects, num_images_per_prompt=2, num_inference_steps=2, output_type="np", show_progress=False,
        generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)],
    ).images  # fmt: skip
    assert both.shape == (2, 64, 64, 3)
    for row, seed in enumerate((1, 2)):
        single = generate(mip, subjects, seed=seed).images
        np.testing.assert_allclose(both[row], single[0], atol=1e-4)
    assert rel(both[0], both[1]) > 1e-3


def test_build_conditioning_lays_out_cfg_rows(photo, mip_pipelines):
    mip = mip_pipelines("sdxl")
    subjects = three_subjects(photo)
    cond = mip.build_conditioning(
        prompt_rows=2, subjects=subjects, cfg=True, rule=MergeRule.OFFICIAL, use_text_weight=True,
        multi_image=MultiImageMode.MEAN, image_size=(64, 64),
    )  # fmt: skip
    assert cond.latent_size == (8, 8)
    assert cond.image_tokens.shape == (4, 3, 4, TINY_SDXL.cross_attention_dim)
    zero_tokens = mip.adapter.project(torch.zeros(1, TINY_SDXL.basic_image_encoder.projection_dim))
    lengths = [len(mip.pipe.tokenizer(s.name, add_special_tokens=False)["input_ids"]) for s in subjects]
    for row in (0, 1):  # the unconditional half: a zero image embedding for every subject ...
        for i in range(3):
            torch.testing.assert_close(cond.image_tokens[row, i], zero_tokens[0])
        assert cond.name_mask[row].sum(-1).tolist() == lengths  # ... and each subject's own name window
    features = [encode_photos(mip.image_encoder, mip.feature_extractor, s.images, False) for s in subjects]
    for row in (2, 3):
        for i in range(3):
            torch.testing.assert_close(cond.image_tokens[row, i], mip.adapter.project(features[i])[0])
    assert cond.name_mask[2].sum(-1).tolist() == lengths
    torch.testing.assert_close(cond.scales, torch.tensor([[0.6, 0.9, 1.2]] * 4))


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_unconditional_names_are_the_authors_window_of_the_empty_string(arch):
    """The authors key the unconditional half with the encoded "" at each subject's own token window
    ``1..n_i`` (their ``entity_indexes`` serve both halves); a loop over subjects and rows."""
    pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
    names = ["wooden pot", "cat", "small red toy car"]
    _, mask = encode_names(pipe, names, "cpu")
    got = unconditional_names(pipe, mask, "cpu")
    if arch == "sdxl":
        empty = pipe.encode_prompt(prompt="", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    else:
        empty = pipe.encode_prompt("", "cpu", 1, False)[0]
    lengths = [len(pipe.tokenizer(name, add_special_tokens=False)["input_ids"]) for name in names]
    assert len(set(lengths)) == 3  # names of different lengths
    for i, length in enumerate(lengths):
        for row in range(mask.shape[1]):
            expected = empty[0, 1 + row] if row < length else torch.zeros_like(empty[0, 0])
            torch.testing.assert_close(got[i, row], expected)


def test_name_rows_are_the_name_encoded_on_its_own():
    pipe = tiny_sdxl_pipeline()
    embeds, mask = encode_names(pipe, ["wooden pot", "cat", ""], "cpu")
    assert mask.tolist() == [[True, True], [True, False], [True, False]]
    alone = pipe.encode_prompt(
        prompt="wooden pot", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    torch.testing.assert_close(embeds[0], alone[0, 1:3])  # after BOS
    empty = pipe.encode_prompt(
        prompt="", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )[0]
    torch.testing.assert_close(embeds[2, 0], empty[0, 1])  # the end-of-text row
    assert torch.count_nonzero(embeds[1, 1]) == 0  # padding rows are zero


# ----------------------------------------------------------------------------------------- defaults


def test_default_rule_is_official_for_mip_and_paper_for_h94(photo, mip_pipelines):
    mip = strong_gate(tiny_mip_pipeline("sdxl", "basic", text_weight=True))
    subjects = three_subjects(photo)
    default = generate(mip, subjects).images
    np.testing.assert_array_equal(
        default, generate(mip, subjects, rule="official", use_text_weight=True).images
    )
    assert rel(default, generate(mip, subjects, rule="paper", use_text_weight=True).images) > 1e-4
    assert rel(default, generate(mip, subjects, rule="official", use_text_weight=False).images) > 1e-4

    h94 = mip_pipelines("sdxl", text_weight=False)
    default = generate(h94, subjects).images
    np.testing.assert_array_equal(
        default, generate(h94, subjects, rule="paper", use_text_weight=False).images
    )
    assert rel(default, generate(h94, subjects, rule="official").images) > 1e-4


def test_default_scale_comes_from_the_adapter(photo, plain_images):
    mip = tiny_mip_pipeline("sd15", "basic", text_weight=True)
    subjects = [Subject("cat", images=[photo(1)])]
    assert (
        rel(
            generate(mip, subjects).images,
            generate(mip, [Subject("cat", images=[photo(1)], scale=1.0)]).images,
        )
        <= 1e-6
    )
    mip.adapter.config = dataclasses.replace(mip.adapter.config, default_scale=0.0)
    np.testing.assert_allclose(
        generate(mip, subjects, rule="uniform").images, plain_images("sd15"), rtol=0, atol=1e-6
    )


# ----------------------------------------------------------------------------------------- once per call


def counter(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_per_call_constants_are_computed_once_not_per_step(arch, photo):
    mip = tiny_mip_pipeline(arch, "basic", text_weight=True)
    pipe = mip.pipe
    encoders = [
        counter(e) for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None
    ]
    layers = list(mip.adapter.processors())
    ip_keys = [counter(mip.adapter.processor(name).to_k_ip) for name in layers]
    text_keys = [counter(pipe.unet.get_submodule(name).to_k) for name in layers]
    image_encoder = counter(mip.image_encoder)

    def run(steps: int):
        for calls in (*encoders, *ip_keys, *text_keys, image_encoder):
            calls[0] = 0
        generate(mip, three_subjects(photo), num_inference_steps=steps)
        return (
            [c[0] for c in encoders],
            sum(c[0] for c in ip_keys),
            sum(c[0] for c in text_keys),
            image_encoder[0],
        )

    short, long = run(2), run(5)
    assert short[0] == long[0] and all(count > 0 for count in short[0])  # text encoders: once per call
    assert short[1] == long[1] == len(layers)  # image keys: once per layer and call
    assert long[2] - short[2] == 3 * len(layers)  # to_k: once per step for the prompt, nothing more
    assert short[3] == long[3] == 3  # one image-encoder pass per subject


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def h94_pipeline(mip_pipelines):
    return mip_pipelines("sdxl", text_weight=False)


def test_subject_construction_errors(photo):
    with pytest.raises(ValueError, match="either images or image_embeds"):
        Subject("cat")
    with pytest.raises(ValueError, match="either images or image_embeds"):
        Subject("cat", images=[photo(1)], image_embeds=torch.zeros(1, 40))
    with pytest.raises(ValueError, match=r"'cat': scale must be a finite number ≥ 0, got -0.5"):
        Subject("cat", images=[photo(1)], scale=-0.5)
    with pytest.raises(ValueError, match="finite"):
        Subject("cat", images=[photo(1)], scale=float("nan"))
    with pytest.raises(ValueError, match="non-empty name"):
        Subject("  ", images=[photo(1)])
    with pytest.raises(ValueError, match="region_mode"):
        Subject("cat", images=[photo(1)], region_mode="add")
    with pytest.raises(TypeError, match="photo #2 is a ndarray"):
        Subject("cat", images=[photo(1), np.zeros((8, 8, 3))])
    assert Subject("cat", images=photo(1)).images[0].size == (40, 48)  # a lone photo is accepted


@pytest.mark.parametrize(
    "kwargs, subjects, error, pattern",
    [
        ({}, [], ValueError, "at least one subject"),
        (
            {"rule": "average"},
            None,
            ValueError,
            "unknown merge rule 'average'; choose one of uniform, paper, official",
        ),
        (
            {"use_text_weight": True},
            None,
            ValueError,
            "use_text_weight=True needs an adapter trained with a text weight",
        ),
        ({"multi_image": "concat"}, None, ValueError, "concat"),
        ({"num_images_per_prompt": 0}, None, ValueError, "num_images_per_prompt"),
        ({"cross_attention_kwargs": {"ip_hidden_states": 1}}, None, ValueError, "set by this pipeline"),
    ],
)
def test_call_argument_errors(h94_pipeline, photo, kwargs, subjects, error, pattern):
    subjects = [Subject("cat", images=[photo(1)])] if subjects is None else subjects
    with pytest.raises(error, match=pattern):
        generate(h94_pipeline, subjects, "a cat", **kwargs)


@pytest.mark.parametrize(
    "region, pattern",
    [
        ((10, 10, 5, 20), r"'cat': box \(10, 10, 5, 20\) must satisfy 0 ≤ x0 < x1 ≤ 64"),
        ((0, 0, 65, 64), "must satisfy"),
        ((-1, 0, 10, 10), "must satisfy"),
        (np.zeros((64, 64)), r"'cat': the region is empty at the latent resolution \(8, 8\)"),
        (np.full((16, 16), 1.5), r"values must lie in \[0, 1\]"),
        (np.ones((4, 4, 3)), "must be 2-D"),
    ],
)
def test_region_errors(h94_pipeline, photo, region, pattern):
    with pytest.raises(ValueError, match=pattern):
        generate(h94_pipeline, [Subject("cat", images=[photo(1)], region=region)], "a cat")


def test_region_forms_agree():
    """A box, a mask array of another size, a PIL mask and a tensor: the same latent mask."""
    from PIL import Image

    from mipadapter.pipeline import region_mask

    def latent(region):
        return region_mask(Subject("cat", image_embeds=torch.zeros(1, 4), region=region), (64, 96), (8, 12))

    box = latent((0, 16, 48, 64))  # x0, y0, x1, y1: the left half, lower three quarters
    half = np.zeros((32, 48), np.float32)
    half[8:, :24] = 1.0
    assert box[:2].sum() == 0 and box[2:, :6].min() == 1 and box[:, 6:].max() == 0
    for form in (half, torch.from_numpy(half), Image.fromarray((half * 255).astype(np.uint8))):
        torch.testing.assert_close(latent(form), box)


def test_mixed_region_modes_are_refused(h94_pipeline, photo):
    subjects = [
        Subject("cat", images=[photo(1)], region=(0, 0, 32, 64)),
        Subject("dog", images=[photo(2)], region=(32, 0, 64, 64), region_mode="multiply"),
    ]
    with pytest.raises(ValueError, match="same region_mode"):
        generate(h94_pipeline, subjects, "a cat and a dog")


@pytest.mark.parametrize(
    "projection, embeds, pattern",
    [
        (
            "basic",
            torch.zeros(2, 41),
            r"basic projection takes features shaped \[k, D\] with D = 40, got \(2, 41\)",
        ),
        ("basic", torch.zeros(2, 17, 40), r"got \(2, 17, 40\)"),
        (
            "plus",
            torch.zeros(48),
            r"plus projection takes features shaped \[k, L, D\] with D = 48, got \(48,\)",
        ),
        ("plus", torch.zeros(1, 17, 40), r"D = 48, got \(1, 17, 40\)"),
    ],
)
def test_wrong_image_embeds_are_refused(projection, embeds, pattern, mip_pipelines):
    mip = mip_pipelines("sdxl", projection, text_weight=False)
    with pytest.raises(ValueError, match=pattern):
        generate(mip, [Subject("cat", image_embeds=embeds)], "a cat")


def test_prompt_and_name_errors(h94_pipeline, photo):
    with pytest.raises(SubjectAlignmentError, match="'dog' does not occur"):
        generate(h94_pipeline, [Subject("dog", images=[photo(1)])], "a cat")
    with pytest.raises(SubjectAlignmentError, match="'cat' and 'cat'"):
        generate(
            h94_pipeline, [Subject("cat", images=[photo(1)]), Subject("cat", images=[photo(2)])], "a cat"
        )
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        generate(h94_pipeline, [Subject("cat", images=[photo(1)])], "  ")


def test_shared_pipelines_are_left_as_they_were(mip_pipelines, photo):
    """After every call above (refused ones included), each shared pipeline still equals a fresh one."""
    mip_pipelines("sdxl", text_weight=False)
    subjects = three_subjects(photo, dog={"region": (0, 0, 32, 64)})
    for (arch, projection, text_weight), shared in mip_pipelines.cache.items():
        fresh = tiny_mip_pipeline(arch, projection, text_weight=text_weight)
        np.testing.assert_array_equal(generate(shared, subjects).images, generate(fresh, subjects).images)


# ----------------------------------------------------------------------------------------- per-layer scales

LAYER_SCALES = {"down": {"block_1": 0.9}, "mid": 0.4, "up": {"block_0": [0.0, 1.3]}}  # the rest: 0


def test_layer_scales_equal_diffusers_set_ip_adapter_scale_dict_form(checkpoint_files, photo):
    """diffusers' dict form (down/mid/up blocks, parts and blocks left out at 0) on SDXL, uniform."""
    files = checkpoint_files("sdxl")
    _, processor = TINY_SDXL.basic_image_encoder.build()
    reference = photo(7)
    theirs = tiny_sdxl_pipeline()
    theirs.feature_extractor = processor
    theirs.load_ip_adapter(**files.load_ip_adapter_kwargs("basic_bin"))
    theirs.set_ip_adapter_scale(LAYER_SCALES)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(prompt="a photo of a cat", ip_adapter_image=reference, num_inference_steps=2,
                      output_type="latent", generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    pipe = tiny_sdxl_pipeline()
    mip = MIPAdapterPipeline(pipe, load_adapter(files.basic_bin, pipe.unet), theirs.image_encoder, processor)

    def ours(scale):
        return mip("a photo of a cat", [Subject("cat", images=[reference], scale=scale)], rule="uniform",
                   num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0),
                   show_progress=False)  # fmt: skip

    out = ours(LAYER_SCALES)
    assert float((out.images - expected).abs().max()) <= 1e-4
    assert out.settings["scales"] == {"cat": LAYER_SCALES}
    others = ({**LAYER_SCALES, "mid": 0.0}, {"down": {"block_1": 0.9}, "mid": 0.4}, {**LAYER_SCALES, "down": 0.0})
    for other in others:  # each part counts
        assert float((ours(other).images - expected).abs().max()) > 1e-4


@pytest.mark.parametrize("scale, message", [
    ([0.5, 1.0], 'subject \'cat\': per-layer scales on a UNet take diffusers\' dict form {"down": {"block_2": '
                 '[0.0, 1.0]}, "mid": ..., "up": ...}, not a list'),
    ({"up": {"block_3": 1.0}}, "subject 'cat': scale up.block_3 names no block with attention layers (this "
                               "UNet's up blocks with attention: block_0, block_1)"),
    ({"up": {"block_0": [1.0, 1.0, 1.0]}}, "subject 'cat': scale up.block_0 takes 2 values (one per attention), "
                                           "got 3"),
])  # fmt: skip
def test_layer_scales_of_the_wrong_form_are_refused(mip_pipelines, photo, scale, message):
    with pytest.raises(ValueError) as error:
        generate(mip_pipelines("sdxl"), [Subject("cat", images=[photo(1)], scale=scale)], "a photo of a cat")
    assert str(error.value) == message


@pytest.mark.parametrize("scale, message", [
    ("1", "subject 'cat': scale must be a finite number ≥ 0, a list of them (one per FLUX double block) or "
          'diffusers\' dict {"down": ..., "mid": ..., "up": ...}, got \'1\''),
    ({"middle": 1.0}, "subject 'cat': scale part 'middle' is not one of down, mid, up"),
    ({"down": {"b1": 1.0}}, "subject 'cat': scale block down.b1 is not named block_<number>"),
    ([1.0, -1.0], "subject 'cat': a scale list holds one finite number ≥ 0 per layer, got [1.0, -1.0]"),
    ([], "subject 'cat': a scale list holds one finite number ≥ 0 per layer, got []"),
])  # fmt: skip
def test_subject_scales_are_checked_on_construction(photo, scale, message):
    with pytest.raises(ValueError) as error:
        Subject("cat", images=[photo(1)], scale=scale)
    assert str(error.value) == message


@pytest.mark.parametrize("projection", ["basic", "plus"])
def test_negative_image_black_feeds_a_black_photo_to_the_unconditional_half(mip_pipelines, photo, projection):
    """On a UNet the default is IP-Adapter's zero input; ``negative_image="black"`` (FLUX's default, diffusers'
    and x-flux's) encodes a black image instead; either is recorded."""
    from mipadapter.pipeline.encoding import black_image

    mip = mip_pipelines("sdxl", projection)
    subjects = [Subject("cat", images=[photo(1)])]
    zeros = generate(mip, subjects, "a photo of a cat")
    black = generate(mip, subjects, "a photo of a cat", negative_image="black")
    assert zeros.settings["negative_image"] == "zeros" and black.settings["negative_image"] == "black"
    assert rel(black.images, zeros.images) > 1e-4
    seen = []
    hook = mip.pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cross_attention_kwargs"]["ip_hidden_states"]), with_kwargs=True
    )
    try:
        generate(mip, subjects, "a photo of a cat", negative_image="black", num_inference_steps=1)
    finally:
        hook.remove()
    features = encode_photos(mip.image_encoder, mip.feature_extractor, [black_image(mip.feature_extractor)],
                             mip.adapter.config.uses_hidden_states)  # fmt: skip
    expected = mip.adapter.project(features)[0].to(seen[0].image_tokens.dtype)
    torch.testing.assert_close(seen[0].image_tokens[0, 0], expected)  # the unconditional half comes first
    with pytest.raises(ValueError, match="negative_image must be 'black' or 'zeros', got 'grey'"):
        generate(mip, subjects, "a photo of a cat", negative_image="grey")


def test_the_plus_negative_is_made_on_the_encoders_device_and_dtype():
    """The all-zero pixels of a Plus adapter's unconditional side are made where the encoder is: on the
    meta device (standing in for a GPU) for an encoder there (CPU pixels would not run); a bfloat16
    encoder gives bfloat16 hidden states close to float32's."""
    from mipadapter.pipeline.encoding import unconditional_features

    encoder, processor = TINY_SDXL.plus_image_encoder.build()
    like = torch.zeros(1, 5, TINY_SDXL.plus_image_encoder.hidden_size)
    reference = unconditional_features(encoder, processor, True, like)
    half = unconditional_features(encoder.to(torch.bfloat16), processor, True, like)
    assert half.dtype == torch.bfloat16 and half.shape == reference.shape
    torch.testing.assert_close(half.float(), reference, atol=0.1, rtol=0.1)
    meta = unconditional_features(encoder.to("meta", torch.float32), processor, True, like)
    assert meta.device.type == "meta" and meta.shape == reference.shape


def test_photos_are_encoded_as_rgb_on_the_encoders_device_whatever_their_mode():
    """A grey or RGBA photo reaches the encoder as RGB even when its processor would not convert it
    (``do_convert_rgb=False``), and the pixels go where the encoder is (the meta device standing in
    for a GPU)."""
    from PIL import Image

    from mipadapter.pipeline.encoding import encode_photos

    encoder, processor = TINY_SDXL.basic_image_encoder.build()
    processor.do_convert_rgb = False
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    grey, rgba = colour.convert("L"), colour.convert("RGBA")
    with torch.no_grad():
        as_grey = encode_photos(encoder, processor, [grey], False)
        as_rgb = encode_photos(encoder, processor, [grey.convert("RGB")], False)
        torch.testing.assert_close(as_grey, as_rgb, rtol=0, atol=0)
        torch.testing.assert_close(encode_photos(encoder, processor, [rgba], False),
                                   encode_photos(encoder, processor, [colour], False), rtol=0, atol=0)  # fmt: skip
        meta = encode_photos(encoder.to("meta"), processor, [colour, grey], True)
    assert meta.device.type == "meta" and meta.shape[0] == 2


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_names_run_each_text_encoder_once_without_an_unconditional_pass(arch):
    """encode_names asks diffusers' encode_prompt for the names alone (no classifier-free guidance): each
    text encoder runs once per call, never again for an unconditional prompt nobody reads (SDXL checkpoints
    that do not zero the empty prompt would encode it)."""
    pipe = BUILDERS[arch]()
    if arch == "sdxl":
        pipe.register_to_config(force_zeros_for_empty_prompt=False)
    calls = []
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    for encoder in encoders:
        encoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(module), with_kwargs=True)
    with torch.no_grad():
        encode_names(pipe, ["cat", "dog"], "cpu")
    assert [id(m) for m in calls] == [id(e) for e in encoders]


def test_the_name_window_is_the_smallest_multiple_holding_the_longest_name():
    """Guards name_window against a plain ceiling, for windows of 1 to 8 rows (the compiled fast path
    pads every call to it, and its tests are outside the mutation runs); None keeps the longest name's
    length; a window under one row is refused by value."""
    import math

    from mipadapter.pipeline.encoding import name_window

    for longest in range(1, 21):
        assert name_window(longest, None) == longest
        for window in range(1, 9):
            rows = name_window(longest, window)
            assert rows == math.ceil(longest / window) * window and type(rows) is int, (longest, window)
    for window in (0, -2):
        with pytest.raises(ValueError) as refused:
            name_window(3, window)
        assert str(refused.value) == f"the name window must be a positive number of tokens, got {window}"


def test_names_padded_to_a_window_keep_their_rows_and_zero_the_rest():
    """encode_names with ``window``: the rows are the window's multiple, each name's own rows as without
    it, every further row zero and masked out."""
    pipe = tiny_sdxl_pipeline()
    names = ["wooden pot", "cat", ""]
    tight, tight_mask = encode_names(pipe, names, "cpu")
    padded, mask = encode_names(pipe, names, "cpu", window=3)
    assert padded.shape[1] == mask.shape[1] == 3 and tight.shape[1] == 2
    assert mask.tolist() == [[True, True, False], [True, False, False], [True, False, False]]
    torch.testing.assert_close(padded[:, :2], tight)
    assert torch.count_nonzero(padded[:, 2]) == 0


def test_names_are_encoded_on_the_device_asked_for():
    """Guards encode_names passing its device to the text encoding: the meta device stands in for a GPU
    (diffusers would otherwise encode on the pipeline's execution device, here the CPU)."""
    pipe = tiny_sdxl_pipeline()
    embeds, mask = encode_names(pipe, ["cat", "red hat"], "meta")
    assert embeds.device.type == mask.device.type == "meta" and embeds.shape[:2] == mask.shape == (2, 2)


def test_tokenizers_splitting_a_name_differently_are_refused_by_name():
    """Guards name_lengths' line when the text encoders' tokenizers disagree on a name's token count."""
    from types import SimpleNamespace

    from mipadapter.pipeline.encoding import name_lengths

    def tokenizer(per_word):
        return lambda text, add_special_tokens: {"input_ids": [0] * (per_word * len(text.split()))}

    pipe = SimpleNamespace(tokenizer=tokenizer(1), tokenizer_2=tokenizer(2))
    assert name_lengths(SimpleNamespace(tokenizer=tokenizer(2)), ["red hat", ""]) == [4, 1]
    with pytest.raises(SubjectAlignmentError) as refused:
        name_lengths(pipe, ["cat", "red hat"])
    assert str(refused.value) == "the text encoders split subject 'cat' into different token counts [1, 2]"


def test_a_name_fills_the_text_encoder_to_its_last_row_and_one_token_more_is_refused():
    """Guards encode_names' fit check at its boundary: after CLIP's start token, a name of 76 tokens
    fills the 77 rows and is encoded; 77 tokens (or 76 padded to a window of 8: 80 rows) do not fit and
    are refused in one line naming the count."""
    pipe = tiny_sdxl_pipeline()
    embeds, mask = encode_names(pipe, ["a " * 76, "cat"], "cpu")
    assert embeds.shape[1] == 76 and mask.sum(dim=1).tolist() == [76, 1]
    for names, window in ((["a " * 77], None), (["a " * 76], 8)):
        with pytest.raises(SubjectAlignmentError) as refused:
            encode_names(pipe, names, "cpu", window=window)
        rows = 77 if window is None else 76
        assert str(refused.value) == f"subject names of {rows} tokens do not fit the text encoder's 77 tokens"
