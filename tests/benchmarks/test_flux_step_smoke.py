"""The FLUX-step benchmark runs end to end on CPU in tiny mode (it executes; no timing is asserted)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flux_step.py"


@pytest.fixture
def flux_step():
    spec = importlib.util.spec_from_file_location("benchmark_flux_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(module, tmp_path, subjects="1,2"):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", "1", "--warmup", "0",
            "--subjects", subjects, "--quiet", "--out", str(out), "--markdown", str(md)]
    assert module.main(argv) == 0
    return json.loads(out.read_text()), md.read_text()


def test_tiny_run_reports_diffusers_variants_and_an_empty_slot(flux_step, tmp_path):
    result, md = _run(flux_step, tmp_path)
    assert set(result["inference"]) == {"text_only", "ip_concat/n=1", "ip_multi/n=1", "ip_concat/n=2", "ip_multi/n=2"}
    for row in result["inference"].values():
        assert len(row["times_ms"]) == 1 and row["median_ms"] > 0
    assert result["inference"]["ip_multi/n=2"]["vs_ip_multi"] == pytest.approx(1.0)
    assert result["inference"]["ip_concat/n=2"]["vs_ip_concat"] == pytest.approx(1.0)
    parity = result["parity"]["ip_multi/n=1 vs ip_concat/n=1"]
    assert parity["relative_error"] < 1e-6 and parity["image_branch_effect"] > 1e-3
    assert all(check["met"] is None and "OursSlot" in check["note"] for check in result["targets"])
    assert "| ip_multi/n=2 |" in md and "n/a" in md
    assert {"torch", "diffusers", "cpu", "date"} <= set(result["card"])
    assert result["settings"]["image_rows"] == 16 and result["settings"]["text_tokens"] == 16


def test_the_ours_slot_is_timed_once_filled(flux_step, tmp_path, monkeypatch):
    """A stand-in for ours (diffusers' one-adapter-per-image processor, which is ``uniform``) goes through the slot."""

    class StandIn:
        rules = ("uniform",)

        @staticmethod
        def install(bench, subjects, rule):
            variant = flux_step.Variant("stand-in", "ip_multi", subjects)
            return bench.installed(variant) if rule == "uniform" else contextlib.nullcontext()

        @staticmethod
        def joint_attention_kwargs(bench, x, subjects, rule):
            return bench.joint_attention_kwargs(flux_step.Variant("stand-in", "ip_multi", subjects), x)

    monkeypatch.setattr(flux_step, "OursSlot", StandIn)
    result, md = _run(flux_step, tmp_path, subjects="2,8")
    assert {"ours_uniform/n=2", "ours_uniform/n=8"} <= set(result["inference"])
    assert result["inference"]["ours_uniform/n=2"]["vs_ip_multi"] > 0
    assert [check["target"] for check in result["targets"]] == ["ours_uniform/n=2 ÷ ip_concat/n=2",
                                                                "ours_uniform/n=8 ÷ ours_uniform/n=2"]
    assert all(check["value"] > 0 and check["met"] in (True, False) for check in result["targets"])
    assert "| ours_uniform/n=8 |" in md
