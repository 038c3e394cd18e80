"""The relevance experiment: noise weighting, the box ratio, and the run on a deterministic fake."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from eval_fakes import CountingPipeline, FakePipeline, make_concept101
from PIL import Image

from mipadapter.eval.datasets import concept101_cases
from mipadapter.eval.detect import FixedBoxDetector, GroundingDinoDetector
from mipadapter.eval.relevance import box_change, relevance_noise, run_relevance, s_relevance
from mipadapter.eval.variants import GenerationSettings


def ones(shape, like):
    return torch.ones(shape)


def test_weighted_noise_follows_relevance_with_the_uniform_norm():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 8, 4)
    relevance = torch.softmax(torch.randn(2, 2, 8), dim=-1)
    uniform = relevance_noise("uniform", level=0.3, noise_seed=5)(z, relevance) - z
    weighted = relevance_noise("weighted", level=0.3, subject=1, noise_seed=5)(z, relevance) - z
    torch.testing.assert_close(uniform.flatten(1).norm(dim=1), weighted.flatten(1).norm(dim=1))
    rms = z.pow(2).mean(dim=(1, 2, 3)).sqrt()
    eps = torch.randn(2, 3, 8, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(uniform, 0.3 * rms.view(2, 1, 1, 1) * eps)
    ratio = weighted / eps  # ∝ A_1 at each position, the same over heads and channels
    w = relevance[:, 1] / relevance[:, 1].mean(dim=-1, keepdim=True)
    torch.testing.assert_close(ratio / ratio[:, :1, :1, :1], (w / w[:, :1]).view(2, 1, 8, 1).expand_as(ratio))


def test_noise_errors():
    with pytest.raises(ValueError, match="mode must be 'uniform' or 'weighted', got 'box'"):
        relevance_noise("box", level=0.1)
    perturb = relevance_noise("weighted", level=0.1, subject=2, sampler=ones)
    with pytest.raises(ValueError, match="subject 2 out of range for 2 subjects"):
        perturb(torch.ones(1, 1, 4, 2), torch.ones(1, 2, 4))
    with pytest.raises(ValueError, match=r"relevance \(1, 2, 5\) does not fit Z_text \(1, 1, 4, 2\)"):
        perturb(torch.ones(1, 1, 4, 2), torch.ones(1, 2, 5))


def test_box_change_by_hand():
    clean = Image.new("RGB", (4, 2), (0, 0, 0))
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[:, :2] = 51  # Δ = 0.2 in the left half
    pixels[:, 2:] = [0, 0, 51 * 3]  # Δ = 0.2 in the right half too (one channel of three at 0.6)
    pixels[0, 3] = 255  # Δ = 1.0 at one pixel outside
    inside, outside = box_change(clean, Image.fromarray(pixels), (0, 0, 2, 2))
    assert inside == pytest.approx(0.2) and outside == pytest.approx((0.2 * 3 + 1.0) / 4)
    with pytest.raises(ValueError, match="leaves no pixels outside"):
        box_change(clean, clean, (0, 0, 4, 2))
    assert s_relevance([(2.0, 1.0), (3.0, 0.0), (1.0, 1.0)]) == pytest.approx(1.5)


def test_relevance_experiment_gives_the_hand_computed_ratio(tmp_path):
    """FakePipeline paints |Δz| of ones-noise: subject 0's weighted noise is 3× as strong in the top-left
    quadrant (120 vs 40 grey levels), subject 1's 3× weaker there. Boxes: subject 0 top-left, subject 1
    bottom-right. Weighted: 3 and 120 / ((40 + 2·120)/3) = 9/7 → S = (3 + 9/7)/2 = 15/7; uniform: 1."""
    root = make_concept101(tmp_path / "c101")
    case = concept101_cases(root, combinations=[0])[0]
    detector = FixedBoxDetector({"backpack": (0, 0, 16, 16), "teapot": (16, 16, 32, 32)})
    fake = FakePipeline()
    kwargs = dict(
        pipeline=lambda: fake,
        detector=detector,
        model="adapter",
        reference_boxes=root / "json_data",
        cases=[case],
        level=0.1,
        sampler=ones,
        settings=GenerationSettings(num_inference_steps=1),
    )
    results = run_relevance(root, tmp_path / "run", **kwargs)
    assert len(fake.calls) == 4  # clean, uniform, weighted per subject — all with the same seed
    assert [c["generator"].initial_seed() for c in fake.calls] == [420] * 4
    assert results["S_relevance"]["uniform"] == pytest.approx(1.0)
    assert results["S_relevance"]["weighted"] == pytest.approx(15 / 7)
    first, second = results["entries"]
    assert first["weighted"]["ratio"] == pytest.approx(3.0) and second["weighted"]["ratio"] == pytest.approx(
        9 / 7
    )
    assert first["weighted"]["delta_in"] == pytest.approx(120 / 255)
    assert (
        json.loads((tmp_path / "run" / "relevance.json").read_text())["S_relevance"] == results["S_relevance"]
    )

    rerun = FakePipeline()
    again = run_relevance(root, tmp_path / "run", **{**kwargs, "pipeline": lambda: rerun})
    assert rerun.calls == [] and again["S_relevance"] == results["S_relevance"]


def test_report_reads_a_relevance_run(tmp_path, capsys):
    """`eval report` on a relevance run reads relevance.json (issue: it asked for results.json)."""
    from mipadapter.cli.main import main

    root = make_concept101(tmp_path / "c101")
    run_relevance(
        root,
        tmp_path / "rel",
        pipeline=FakePipeline,
        model="adapter",
        reference_boxes=root / "json_data",
        cases=concept101_cases(root, combinations=[0])[:1],
        sampler=ones,
        level=0.1,
        detector=FixedBoxDetector({"backpack": (0, 0, 16, 16), "teapot": (16, 16, 32, 32)}),
    )
    assert main(["eval", "report", str(tmp_path / "rel")]) == 0
    out = capsys.readouterr().out
    assert "S_relevance" in out and "| rel | adapter | 0.1 | 2 | 2 | 1.0000 | 2.1429 |" in out
    (tmp_path / "rel" / "relevance.json").write_text('{"schema": "other"}')
    assert main(["eval", "report", str(tmp_path / "rel")]) == 2
    assert "not a relevance result" in capsys.readouterr().err


def test_undetected_subjects_are_listed_not_scored(tmp_path):
    root = make_concept101(tmp_path / "c101")
    case = concept101_cases(root, combinations=[0])[0]
    results = run_relevance(
        root,
        tmp_path / "run",
        pipeline=FakePipeline,
        model="adapter",
        reference_boxes=root / "json_data",
        cases=[case],
        sampler=ones,
        detector=FixedBoxDetector({"backpack": (0, 0, 16, 16)}),
    )
    assert results["detected"] == 1 and results["not_detected"] == [{"case": 0, "name": "teapot"}]
    assert results["S_relevance"]["weighted"] == pytest.approx(3.0)


def test_the_perturbation_reaches_the_real_adapter_pipeline(tmp_path):
    from mipadapter.testing.mip import tiny_mip_pipeline

    root = make_concept101(tmp_path / "c101")
    case = concept101_cases(root, combinations=[0])[0]
    pipe = CountingPipeline(tiny_mip_pipeline())
    seen = []

    def sampler(shape, like):
        seen.append(shape)
        return torch.randn(shape, generator=torch.Generator().manual_seed(len(seen)))

    results = run_relevance(
        root,
        tmp_path / "run",
        pipeline=lambda: pipe,
        model="adapter",
        reference_boxes=root / "json_data",
        cases=[case],
        sampler=sampler,
        level=1.0,
        detector=FixedBoxDetector({"backpack": (0, 0, 32, 64), "teapot": (32, 0, 64, 64)}),
        settings=GenerationSettings(num_inference_steps=1),
    )
    assert pipe.calls == 4 and seen and all(len(shape) == 4 for shape in seen)
    clean = np.asarray(Image.open(tmp_path / "run" / "relevance" / "clean" / "00000.png"), dtype=float)
    noisy = np.asarray(Image.open(tmp_path / "run" / "relevance" / "uniform" / "00000.png"), dtype=float)
    assert np.abs(clean - noisy).mean() > 0
    assert results["S_relevance"]["uniform"] is not None and results["S_relevance"]["weighted"] is not None


def test_base_model_run_has_no_adapter_and_leaves_the_pipeline_as_it_was(tmp_path):
    """The paper's setting: the base pipeline alone. During the run every attention layer holds the
    eval-only processor (no MIP processor anywhere); afterwards the pipeline's own processors are back,
    and the clean image equals the stock pipeline's image."""
    from mipadapter.eval.text_noise import TextNoiseProcessor
    from mipadapter.modeling.processor import MIPAttnProcessor
    from mipadapter.testing import tiny_sdxl_pipeline

    root = make_concept101(tmp_path / "c101")
    case = concept101_cases(root, combinations=[0])[0]
    pipe = tiny_sdxl_pipeline(0)
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    during = []

    def sampler(shape, like):
        during.append({type(p) for p in pipe.unet.attn_processors.values()})
        return torch.randn(shape, generator=torch.Generator().manual_seed(len(during)))

    settings = GenerationSettings(num_inference_steps=2)
    results = run_relevance(
        root,
        tmp_path / "run",
        pipeline=lambda: pipe,
        cases=[case],
        sampler=sampler,
        level=1.0,
        detector=FixedBoxDetector({"backpack": (0, 0, 32, 64), "teapot": (32, 0, 64, 64)}),
        settings=settings,
    )
    assert during and all(kinds == {TextNoiseProcessor} for kinds in during)
    assert not any(issubclass(kind, MIPAttnProcessor) for kinds in during for kind in kinds)
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    stock = pipe(
        prompt=case.prompt,
        generator=torch.Generator().manual_seed(420),
        output_type="pil",
        **settings.base_call_kwargs(),
    ).images[0]
    clean = Image.open(tmp_path / "run" / "relevance" / "clean" / "00000.png")
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(stock))
    noisy = np.asarray(Image.open(tmp_path / "run" / "relevance" / "uniform" / "00000.png"), dtype=float)
    assert np.abs(noisy - np.asarray(clean, dtype=float)).mean() > 0
    assert results["settings"]["model"] == "base" and "conditional half" in results["settings"]["cfg"]
    assert results["S_relevance"]["weighted"] is not None
    with pytest.raises(TypeError, match="model='base' needs the base diffusers pipeline"):
        run_relevance(
            root, tmp_path / "x", pipeline=FakePipeline, cases=[case], detector=FixedBoxDetector({})
        )


def _cross_attention(pipe):
    name = next(n for n in pipe.unet.attn_processors if n.endswith("attn2.processor"))
    module = pipe.unet.get_submodule(name[: -len(".processor")])
    return module


def test_text_noise_processor_is_stock_attention_and_perturbs_only_the_conditional_half():
    """Without a plan it equals diffusers' AttnProcessor2_0; with one, the unconditional rows are
    untouched and the relevance handed to the perturbation equals a loop over positions of
    softmax_p(K_name·Q/√d), averaged over name tokens and heads."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mipadapter.eval.text_noise import TextNoisePlan, TextNoiseProcessor
    from mipadapter.pipeline import encode_names
    from mipadapter.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    attn = _cross_attention(pipe)
    torch.manual_seed(0)
    b, p = 4, 16
    hidden = torch.randn(b, p, attn.to_q.in_features)
    text = torch.randn(b, 77, attn.to_k.in_features)
    plain = AttnProcessor2_0()(attn, hidden, text)
    processor = TextNoiseProcessor()
    torch.testing.assert_close(processor(attn, hidden, text), plain, rtol=0, atol=0)

    embeds, mask = encode_names(pipe, ["cat", "red backpack"], torch.device("cpu"))
    seen = {}

    def perturb(z, relevance):
        seen["z"], seen["relevance"] = z.clone(), relevance.clone()
        return z + 1.0

    out = processor(attn, hidden, text, text_noise=TextNoisePlan(perturb, embeds, mask, cfg=True))
    torch.testing.assert_close(out[:2], plain[:2], rtol=0, atol=0)  # unconditional half as it was
    assert not torch.allclose(out[2:], plain[2:])
    heads = attn.heads
    query = attn.to_q(hidden[2:]).view(2, p, heads, -1)  # [b', p, h, d]
    keys = attn.to_k(embeds.to(attn.to_k.weight.dtype)).view(2, -1, heads, query.shape[-1])  # [n, m, h, d]
    expected = torch.zeros(2, 2, p)
    for row in range(2):
        for i in range(2):
            tokens = [j for j in range(mask.shape[1]) if mask[i, j]]
            for j in tokens:
                for h in range(heads):
                    logits = (
                        torch.stack([keys[i, j, h] @ query[row, q, h] for q in range(p)])
                        / query.shape[-1] ** 0.5
                    )
                    expected[row, i] += torch.softmax(logits, dim=0) / (len(tokens) * heads)
    torch.testing.assert_close(seen["relevance"], expected, rtol=1e-5, atol=1e-6)
    assert seen["z"].shape == (2, heads, p, query.shape[-1])
    # without CFG every row is conditional
    processor(attn, hidden, text, text_noise=TextNoisePlan(perturb, embeds, mask, cfg=False))
    assert seen["z"].shape[0] == b


class _FakeProcessor:
    def __call__(self, images, text, return_tensors):
        self.text = text
        return _Batch(input_ids=torch.zeros(1, 3, dtype=torch.long), pixel_values=torch.zeros(1, 3, 4, 4))

    def post_process_grounded_object_detection(
        self, outputs, input_ids, threshold, text_threshold, target_sizes
    ):
        if self.text == "cat.":
            return [
                {
                    "scores": torch.tensor([0.4, 0.9]),
                    "boxes": torch.tensor([[0, 0, 5, 5], [-3.0, 2.0, 70.0, 9.0]]),
                }
            ]
        return [{"scores": torch.tensor([]), "boxes": torch.zeros(0, 4)}]


class _Batch(dict):
    def to(self, device):
        return self


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **inputs):
        return None


def test_grounding_dino_detector_takes_the_best_box_per_label_clipped_to_the_image():
    detector = GroundingDinoDetector(_FakeModel(), _FakeProcessor(), model_id="fake-gdino")
    boxes = detector.detect(Image.new("RGB", (64, 32)), ["Cat", "sofa"])
    assert boxes == [(0.0, 2.0, 64.0, 9.0), None]
