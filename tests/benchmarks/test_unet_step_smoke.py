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
    assert set(result["inference"]) == expected
    assert set(result["training"]) == {"ip_concat/n=2", "ours_official/n=2", "authors/n=2"}
    for row in [*result["inference"].values(), *result["training"].values()]:
        assert len(row["times_ms"]) == 1 and row["median_ms"] > 0
    assert result["inference"]["ip_concat/n=3"]["vs_ip_concat"] == pytest.approx(1.0)

    # the variants that must agree do, on the whole UNet
    for label, parity in result["parity"].items():
        assert parity["relative_error"] < 1e-4, label
        assert parity["image_branch_effect"] > 1e-3, label  # the image branch is not a no-op

    # nothing constant per call is recomputed per step: one image-key and one name-key projection per layer
    generation = result["generation"]
    layers = generation["cross_attention_layers"]
    assert generation["ours"]["to_k_ip"] == layers and generation["ours"]["name_keys"] == layers
    assert generation["authors"]["to_k_ip"] == layers * generation["steps"] * generation["subjects"]
    assert {"torch", "diffusers", "cpu", "date"} <= set(result["card"])
