"""``benchmarks/gpu.py`` (every GPU figure in one call under a time budget) runs end to end with ``--tiny``:
every part measured or listed as skipped with why, on disk as it goes, the budget honoured. No timing is
asserted beyond the budget."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("benchmark_gpu", BENCHMARKS / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _run(gpu, out_dir: Path, *extra: str) -> tuple[dict, str, float]:
    begin = time.monotonic()
    assert gpu.main(["--tiny", "--out-dir", str(out_dir), *extra]) == 0
    elapsed = time.monotonic() - begin
    return json.loads((out_dir / "gpu.json").read_text()), (out_dir / "gpu.md").read_text(), elapsed


def test_tiny_run_measures_every_part_and_writes_one_section(gpu, tmp_path):
    summary, md, elapsed = _run(gpu, tmp_path, "--budget", "300")
    names = [part.name for part in gpu.PARTS]
    assert [part["name"] for part in summary["parts"]] == names and summary["not_run_yet"] == []
    assert all(part["status"] == "done" for part in summary["parts"]), summary["parts"]
    assert summary["elapsed_s"] <= 300 and elapsed <= 300
    assert {"torch", "diffusers", "cpu", "date"} <= set(summary["card"]) and summary["probe"]["unit_s"] > 0

    results = {}
    for part in summary["parts"]:  # each part's own JSON and Markdown, as the script writes them
        results[part["name"]] = json.loads((tmp_path / part["json"]).read_text())
        assert (tmp_path / part["markdown"]).read_text().rstrip() in md
        assert f"| {part['name']} | done |" in md and f"### {part['title']}" in md
    assert md.startswith("## Tiny rehearsal of `benchmarks/gpu.py` (CPU, tiny configs; not GPU figures)")
    assert "torch " + torch.__version__ in md and "None measured (measured on CUDA only)." in md

    inference = results["inference"]
    assert {"text_only", "ip_masked/n=4", "ours_paper/n=8", "authors/n=2"} <= set(inference["inference"])
    assert inference["training"] == {} and inference["generation"]["ours"]["per_call"]
    assert set(results["training"]["training"]) == {"ip_concat/n=2", "ours_official/n=2", "authors/n=2"}
    assert results["training"]["inference"] == {} and results["training_memory"]["settings"]["train_size"] == 128
    assert set(results["flux"]["inference"]) >= {"ip_concat/n=8", "ip_multi/n=8", "ours_paper/n=8"}
    assert [case["case"] for case in results["operators"]["cases"]] == ["64x2:2:official", "64x2:2:paper",
                                                                        "64x2:2:uniform"]
    compiled = results["compiled"]
    assert compiled["graphs"] == {"compiled": 3, "variants": 3}  # one graph per variant, none recompiled
    assert all(report["graph_breaks"] == 0 for report in compiled["graph_breaks"].values())

    # every ratio in the section is the part's own, with its verdict
    rows = inference["inference"]
    ratio = rows["ours_official/n=2"]["median_ms"] / rows["ip_concat/n=2"]["median_ms"]
    verdict = "yes" if ratio <= 1.05 else "**no**"
    assert (f"| inference | ours_official/n=2 ÷ ip_concat/n=2 (inference) | {ratio:.3f} | 1.05 | {verdict} |"
            in md)
    flux_rows = results["flux"]["inference"]
    ratio = flux_rows["ours_paper/n=8"]["median_ms"] / flux_rows["ours_paper/n=2"]["median_ms"]
    assert f"| flux | ours_paper/n=8 ÷ ours_paper/n=2 | {ratio:.3f} | 1.1 |" in md
    assert "| training | ours_official/n=2 ÷ ip_concat/n=2 (training) |" in md
    assert "Compiled graphs (eager): 3 for 3 variants" in md


def test_a_small_budget_skips_parts_says_why_and_is_kept(gpu, tmp_path):
    budget = 4.0
    summary, md, elapsed = _run(gpu, tmp_path, "--budget", str(budget))
    parts = {part["name"]: part for part in summary["parts"]}
    assert list(parts) == [part.name for part in gpu.PARTS]  # every part listed: measured or skipped
    skipped = [part for part in parts.values() if part["status"] == "skipped"]
    assert parts["compiled"]["status"] == "skipped"  # its estimate alone is past the budget
    for part in skipped:
        assert part["reason"] == (f"estimated {part['scaled_estimate_s']:.0f} s, "
                                  f"{max(part['budget_left_s'], 0):.0f} s of the budget left")
        assert part["scaled_estimate_s"] > part["budget_left_s"]
        assert f"| {part['name']} | skipped: {part['reason']} |" in md
        assert not (tmp_path / f"{part['name']}.json").exists()
        for owed in part["owes"]:
            assert f"| {part['name']} | {owed} | not measured (skipped) |" in md
    # over the budget by at most one measured step: the probe or a part
    longest = max([part["seconds"] for part in parts.values()] + [(summary["probe"] or {}).get("seconds", 0.0)])
    assert summary["elapsed_s"] <= budget + longest
    # the script's own clock, not this test's: under load, start-up outside the budget took seconds;
    # elapsed_s is rounded to 0.01 s, so it may exceed the test's clock by half of that
    assert summary["elapsed_s"] <= elapsed + 0.005


def test_a_budget_below_every_estimate_measures_nothing_and_lists_everything(gpu, tmp_path):
    summary, md, elapsed = _run(gpu, tmp_path, "--budget", "0.5")
    assert summary["probe"] is None and "probe" not in md.split("**Targets**")[0].lower().replace("`", "")
    assert [part["status"] for part in summary["parts"]] == ["skipped"] * len(gpu.PARTS)
    assert elapsed < 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]
    assert "| inference | ours_official/n=2 ÷ authors/n=2 (inference) ≤ 0.45 | not measured (skipped) |" in md


def _failing_on(gpu, monkeypatch, name: str, error: BaseException) -> None:
    real = gpu.call

    def call(part, argv, benches, deadline):
        if part.name == name:
            raise error
        return real(part, argv, benches, deadline)

    monkeypatch.setattr(gpu, "call", call)


def test_a_run_cut_short_leaves_every_part_it_measured(gpu, tmp_path, monkeypatch):
    _failing_on(gpu, monkeypatch, "operators", KeyboardInterrupt())  # the machine taken back mid-run
    with pytest.raises(KeyboardInterrupt):
        gpu.main(["--tiny", "--out-dir", str(tmp_path), "--parts", "processor,operators"])
    summary = json.loads((tmp_path / "gpu.json").read_text())
    assert [(part["name"], part["status"]) for part in summary["parts"]] == [("processor", "done")]
    assert "operators" in summary["not_run_yet"] and (tmp_path / "processor.json").exists()
    md = (tmp_path / "gpu.md").read_text()
    assert "### One cross-attention layer at SDXL's shapes" in md and "| operators | not reached yet |" in md


def test_a_failing_part_is_recorded_and_the_next_one_runs(gpu, tmp_path, monkeypatch):
    _failing_on(gpu, monkeypatch, "processor", RuntimeError("CUDA out of memory. Tried to allocate 9 GiB\nmore"))
    summary, md, _ = _run(gpu, tmp_path, "--parts", "processor,operators")
    processor, operators = summary["parts"]
    assert processor["status"] == "failed" and processor["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 9 GiB"
    assert operators["status"] == "done"
    assert "| processor | failed: RuntimeError: CUDA out of memory. Tried to allocate 9 GiB |" in md


def test_flux_is_skipped_with_a_note_on_a_card_under_80_gb(gpu, tmp_path):
    assert gpu.flux_fits({"gpu_memory_bytes": 141e9}) is None and gpu.flux_fits({}) is None
    assert "the card has 48 GB" in gpu.flux_fits({"gpu_memory_bytes": 48e9})
    run = gpu.Run(tiny=True, budget_s=60.0, started=time.monotonic(), command="test",
                  card={**gpu.card(torch.device("cpu")), "gpu_memory_bytes": 48e9})
    flux = next(part for part in gpu.PARTS if part.name == "flux")
    gpu.run_parts(run, [flux], tmp_path, lambda message: None)
    (part,) = run.parts
    assert part["status"] == "skipped" and "needs an 80 GB card" in part["reason"]
    assert not (tmp_path / "flux.json").exists() and "needs an 80 GB card" in (tmp_path / "gpu.md").read_text()


def test_estimates_follow_the_settings_and_the_probe(gpu):
    costs = gpu.COSTS["gpu"]
    probe = gpu.Probe(unit_s=0.05, build_s=8.0, pixels=1024 * 1024 * 2, seconds=9.0)
    inference = gpu.PARTS[0]
    base = gpu.estimate(inference, inference.argv, costs, probe, built=True)
    more = gpu.estimate(inference, (*inference.argv, "--repeats", "23"), costs, probe, built=True)
    assert more.rounds_s == pytest.approx(base.rounds_s * (3 + 23) / (3 + 10))  # warm-up 3
    assert gpu.estimate(inference, inference.argv, costs, probe, built=False).fixed_s == pytest.approx(
        base.fixed_s + 8.0)
    slower = gpu.Probe(unit_s=0.10, build_s=8.0, pixels=probe.pixels, seconds=9.0)
    assert gpu.estimate(inference, inference.argv, costs, slower, built=True).total_s == pytest.approx(
        2 * base.total_s)
    training = gpu.PARTS[1]  # 512² batch 4 = half the probe's pixel-rows, forward + backward
    train = gpu.estimate(training, training.argv, costs, probe, built=True)
    assert train.rounds_s == pytest.approx(13 * gpu.TRAIN_FACTOR * 0.05 * 0.5 * (1.15 + 1.2 + 2.4))
    compiled = gpu.PARTS[-1]
    assert gpu.estimate(compiled, compiled.argv, costs, probe, built=True).fixed_s >= 3 * costs.compile_graph_s
    for part in gpu.PARTS:  # every GPU command parses, and asks for CUDA in the dtype its targets are set for
        assert gpu.estimate(part, gpu.argv_of(part, tiny=False), costs, probe, built=False).total_s > 0
        assert "cuda" in part.argv and {"fp16": "flux" != part.name, "bf16": "flux" == part.name} == {
            dtype: dtype in part.argv for dtype in ("fp16", "bf16")}
        if part.script == "processor_layer":
            cases = part.argv[part.argv.index("--cases") + 1].split(",")
            assert {gpu.processor_layer.parse_case(case)[:2] for case in cases} <= {(4096, 10), (1024, 20)}


def test_the_budget_scale_only_rises(gpu):
    run = gpu.Run(tiny=True, budget_s=10.0, started=time.monotonic(), card={}, command="test")
    assert run.scale() == 1.0
    run.parts.append({"status": "done", "estimate_s": 2.0, "seconds": 1.0})
    assert run.scale() == 1.0  # faster than estimated: estimates are never lowered
    run.parts.append({"status": "done", "estimate_s": 2.0, "seconds": 7.0})
    assert run.scale() == pytest.approx(2.0)
    run.parts.append({"status": "skipped", "estimate_s": 100.0, "seconds": 0.0})
    assert run.scale() == pytest.approx(2.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tiny", "--parts", "inference,bogus"], "--parts takes inference, training, training_memory, flux, "
                                                    "processor, operators, compiled, got 'inference,bogus'"),
        (["--tiny", "--budget", "0"], "--budget must be a positive number of seconds, got 0"),
        (["--out-dir", "OUT"], "no CUDA device here: run it on the GPU machine, or add --tiny for the CPU rehearsal"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(gpu, tmp_path, capsys, argv, message):
    if "--tiny" not in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    out_dir = tmp_path / "figures"
    argv = [str(out_dir) if arg == "OUT" else arg for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        gpu.main([*argv, "--out-dir", str(out_dir)] if "--out-dir" not in argv else argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    assert not out_dir.exists()
