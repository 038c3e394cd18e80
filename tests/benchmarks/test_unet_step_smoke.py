"""The UNet-step benchmark runs end to end on CPU in tiny mode (it executes; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "unet_step.py"


@pytest.fixture(scope="module")
def unet_step():
    spec = importlib.util.spec_from_file_location("benchmark_unet_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_run_reports_every_variant(unet_step, tmp_path):
    out = tmp_path / "results.json"
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "1", "--warmup", "0",
            "--subjects", "1,3", "--gen-steps", "2", "--quiet", "--out", str(out), "--markdown", str(tmp_path / "r.md")]
    assert unet_step.main(argv) == 0
    result = json.loads(out.read_text())
    assert "| ours_official/n=3 |" in (tmp_path / "r.md").read_text()

    expected = {"text_only"}
    for n in (1, 3):  # the per-call check runs 2 of 3 subjects: inputs sliced, as a pipeline may
        expected |= {f"ip_concat/n={n}", f"ip_masked/n={n}", f"authors/n={n}"}
        expected |= {f"ours_{rule}/n={n}" for rule in ("uniform", "paper", "official")}
    # the mixed case (2 adapters, 2 subjects) beside the single-adapter 2-subject case it is divided by
    expected |= {f"{kind}_{rule}/n=2" for kind in ("ours", "mixed") for rule in ("uniform", "paper", "official")}
    assert set(result["inference"]) == expected
    assert set(result["training"]) == {"ip_concat/n=2", "ours_official/n=2", "authors/n=2"}
    for row in [*result["inference"].values(), *result["training"].values()]:
        assert len(row["times_ms"]) == 1 and row["median_ms"] > 0
    assert result["inference"]["ip_concat/n=3"]["vs_ip_concat"] == pytest.approx(1.0)
    for rule in ("uniform", "paper", "official"):
        mixed, single = result["inference"][f"mixed_{rule}/n=2"], result["inference"][f"ours_{rule}/n=2"]
        assert mixed["vs_single_adapter"] == pytest.approx(mixed["median_ms"] / single["median_ms"])
        assert f"mixed_{rule}/n=2 ÷ ours_{rule}/n=2 = " in (tmp_path / "r.md").read_text()

    # the variants that must agree do, on the whole UNet
    for label, parity in result["parity"].items():
        assert parity["relative_error"] < 1e-4, label
        assert parity["image_branch_effect"] > 1e-3, label  # the image branch is not a no-op

    # nothing constant per call is recomputed per step: one image-key and one name-key projection per layer
    generation = result["generation"]
    layers = generation["cross_attention_layers"]
    assert generation["ours"]["to_k_ip"] == layers and generation["ours"]["name_keys"] == layers
    assert generation["authors"]["to_k_ip"] == layers * generation["steps"] * generation["subjects"]
    # a mix: each adapter projects its own subject once per layer and call, whatever the steps
    assert generation["mixed"]["to_k_ip"] == 2 * layers and generation["mixed"]["name_keys"] == layers
    assert generation["mixed"]["per_call"]
    assert {"torch", "diffusers", "cpu", "date"} <= set(result["card"])


def test_the_mixed_case_routes_each_subject_through_its_own_adapter(unet_step):
    """The mixed variant computes what it says: its UNet output differs from the single-adapter one, and
    equals it once the second adapter is given the first one's weights and subject 1 its tokens of the
    single case, each repeated 4 times (16 tokens, the same attention average). Fails when the bench prepares
    the mix with one adapter's projections only, or lets subject 0's padding into its softmax."""
    import torch

    bench = unet_step.Bench(unet_step.TINY, torch.device("cpu"), torch.float32)
    x = bench.inputs(2, 64, 2)
    variant, single = unet_step.Variant("m", "mixed", 2, "uniform"), unet_step.Variant("s", "ours", 2, "uniform")
    with bench.installed(variant), torch.no_grad():
        mixed = bench.forward(variant, x, bench.mixed_conditioning(x, "uniform"))
        alone = bench.forward(single, x, bench.conditioning(x, 2, "uniform"))
        assert unet_step.relative_error(mixed, alone) > 1e-3
        for ours, second in zip(bench.adapter.processors().values(), bench.second.processors().values(), strict=True):
            second.load_state_dict(ours.state_dict())
        borrowed = bench.forward(variant, x, bench.mixed_conditioning(x, "uniform"))
        assert unet_step.relative_error(borrowed, mixed) > 1e-3  # subject 1 went through the second adapter
        # subject 1's 4 tokens each repeated 4 times: the same softmax average over 16 tokens as over 4
        x["plus_tokens"] = x["image_tokens"][:, 1:2].repeat(1, 1, unet_step.PLUS_TOKENS // unet_step.IMAGE_TOKENS, 1)
        same = bench.forward(variant, x, bench.mixed_conditioning(x, "uniform"))
    assert unet_step.relative_error(same, alone) < 1e-5
