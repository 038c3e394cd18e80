"""`mipadapter eval`: argument parsing into one library call per verb."""

from __future__ import annotations

import pytest
from eval_fakes import FakePipeline, make_concept101

from mipadapter.cli.main import build_parser, main
from mipadapter.eval.runner import run_concept101
from mipadapter.eval.variants import GenerationSettings


def test_eval_verbs_are_registered():
    parser = build_parser()
    args = parser.parse_args(
        [
            "eval",
            "concept101",
            "--benchmark-dir",
            "d",
            "--out",
            "o",
            "--seeds",
            "420,421",
            "--rule",
            "paper",
            "--steps",
            "5",
        ]
    )
    assert args.verb == "concept101" and args.seeds == [420, 421] and args.rule == "paper" and args.steps == 5
    assert (
        parser.parse_args(["eval", "dreambench", "--dataset-dir", "d", "--out", "o"]).images_per_prompt == 4
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "concept101", "--benchmark-dir", "d", "--out", "o", "--seeds", "x"])


def test_concept101_arguments_reach_the_library(monkeypatch):
    seen = {}

    def fake(benchmark_dir, out_dir, **kwargs):
        seen.update(kwargs, benchmark_dir=benchmark_dir, out_dir=out_dir)
        return None

    monkeypatch.setattr("mipadapter.eval.api.evaluate_concept101", fake)
    code = main(
        [
            "eval",
            "concept101",
            "--benchmark-dir",
            "b",
            "--out",
            "o",
            "--variants",
            "table4",
            "--seeds",
            "1,2",
            "--combinations",
            "0,3",
            "--on-quirk",
            "skip",
            "--scale",
            "0.7",
            "--device",
            "cpu",
            "--tiny",
        ]
    )
    assert code == 0
    assert seen["variants"] == "table4" and seen["seeds"] == [1, 2] and seen["combinations"] == [0, 3]
    assert seen["on_quirk"] == "skip" and seen["settings"].scale == 0.7 and seen["options"].tiny


def test_report_prints_the_table(tmp_path, tiny_encoders, capsys):
    root = make_concept101(tmp_path / "c101")
    run_concept101(
        root,
        tmp_path / "run",
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=GenerationSettings(num_inference_steps=1),
    )
    assert main(["eval", "report", str(tmp_path / "run"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| run | official | 4 | 420 |" in out and "CLIP-T = 2.5" in out
    assert main(["eval", "report", str(tmp_path / "missing")]) == 2
    assert "results.json not found" in capsys.readouterr().err
