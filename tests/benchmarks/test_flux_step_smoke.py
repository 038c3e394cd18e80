"""The FLUX-step benchmark runs end to end on CPU in tiny mode: every variant, ours included, and the parities
(no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "flux_step.py"


@pytest.fixture
def flux_step():
    spec = importlib.util.spec_from_file_location("benchmark_flux_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(module, tmp_path, *extra, subjects="1,2,8", repeats="1"):
    out, md = tmp_path / "results.json", tmp_path / "results.md"
    argv = ["--config", "tiny", "--device", "cpu", "--dtype", "fp32", "--repeats", repeats, "--warmup", "0",
            "--subjects", subjects, "--quiet", "--out", str(out), "--markdown", str(md), *extra]
    assert module.main(argv) == 0
    return json.loads(out.read_text()), md.read_text()


def test_tiny_run_times_diffusers_and_ours_and_checks_parity(flux_step, tmp_path):
    result, md = _run(flux_step, tmp_path)
    expected = {"text_only"} | {
        f"{kind}/n={n}" for n in (1, 2, 8) for kind in ("ip_concat", "ip_multi", "ours_uniform", "ours_paper")
    }
    assert set(result["inference"]) == expected
    for row in result["inference"].values():
        assert len(row["times_ms"]) == 1 and row["median_ms"] > 0
    assert result["inference"]["ours_paper/n=2"]["kind"] == "ours"
    assert result["inference"]["ours_paper/n=8"]["vs_ip_multi"] > 0
    assert result["inference"]["ip_concat/n=2"]["vs_ip_concat"] == pytest.approx(1.0)

    parity = result["parity"]
    assert parity["ip_multi/n=1 vs ip_concat/n=1"]["relative_error"] < 1e-6
    for n in (1, 2, 8):  # ours under uniform is diffusers with one adapter per image, and the image term acts
        check = parity[f"ours_uniform/n={n} vs ip_multi/n={n}"]
        assert check["relative_error"] < 1e-5 and check["image_branch_effect"] > 1e-2
        assert check["paper_vs_uniform"] > 1e-2  # the paper rule routes: not the uniform sum

    assert [check["target"] for check in result["targets"]] == [
        "ours_uniform/n=2 ÷ ip_concat/n=2", "ours_uniform/n=8 ÷ ours_uniform/n=2",
        "ours_paper/n=2 ÷ ip_concat/n=2", "ours_paper/n=8 ÷ ours_paper/n=2",
    ]
    rows = result["inference"]
    paper_target = result["targets"][2]
    assert paper_target["value"] == pytest.approx(rows["ours_paper/n=2"]["median_ms"] / rows["ip_concat/n=2"]["median_ms"])
    assert paper_target["met"] == (paper_target["value"] <= 1.05) and "ip_multi/n=2" in paper_target["note"]
    assert set(result["prepare_ms"]) == {f"ours_{rule}/n={n}" for rule in ("uniform", "paper") for n in (1, 2, 8)}

    assert "| ours_paper/n=8 |" in md and "ours_uniform/n=2 vs ip_multi/n=2: relative error" in md
    assert "`ip_concat`" in md and "python benchmarks/flux_step.py --config tiny" in md
    assert {"torch", "diffusers", "cpu", "date"} <= set(result["card"])
    assert result["settings"]["image_rows"] == 16 and result["settings"]["text_tokens"] == 16


def test_ours_is_prepared_once_per_conditioning_and_shares_the_diffusers_weights(flux_step, tmp_path, monkeypatch):
    prepared = []
    original = flux_step.MIPAdapter.prepare

    def counting(self, cond):
        prepared.append((cond.num_subjects, cond.rule.value))
        return original(self, cond)

    monkeypatch.setattr(flux_step.MIPAdapter, "prepare", counting)
    _run(flux_step, tmp_path, "--rules", "paper", subjects="2", repeats="3")
    assert prepared == [(2, "paper")]  # not once per step: three timed rounds reuse it

    bench = flux_step.Bench(flux_step.TINY, torch.device("cpu"), torch.float32)
    diffusers_processor = bench.ip_processors(2)["transformer_blocks.1.attn.processor"]
    ours = bench.adapter.processor("transformer_blocks.1.attn")
    assert all(linear is ours.to_k_ip for linear in diffusers_processor.to_k_ip)
    assert all(linear is ours.to_v_ip for linear in diffusers_processor.to_v_ip)


def test_targets_say_what_was_not_measured(flux_step, tmp_path):
    result, md = _run(flux_step, tmp_path, "--rules", "uniform", subjects="1")
    assert [check["met"] for check in result["targets"]] == [None, None]
    assert all("--subjects needs 2 and 8" in check["note"] for check in result["targets"])
    assert "n/a" in md
    result, _ = _run(flux_step, tmp_path, "--rules", "", subjects="2")
    assert all(check["met"] is None and "--rules" in check["note"] for check in result["targets"])
    assert not any(name.startswith("ours") for name in result["inference"])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--rules", "paper,official", "--rules takes uniform, paper (FLUX adapters have no text weight for official), got official"),
        ("--subjects", "0,2", "--subjects takes numbers ≥ 1, got '0,2'"),
        ("--subjects", "two", "--subjects takes numbers like 1,2,8, got 'two'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(flux_step, tmp_path, capsys, flag, value, message):
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exit_info:
        flux_step.main(["--config", "tiny", "--device", "cpu", "--out", str(out), flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
