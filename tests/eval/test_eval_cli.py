"""`mipadapter eval`: argument parsing into one library call per verb."""

from __future__ import annotations

import pytest
from eval_fakes import FakePipeline, make_concept101

from mipadapter.cli.main import build_parser, main
from mipadapter.eval.runner import run_concept101
from mipadapter.eval.variants import AUTHORS_NEGATIVE_PROMPT, GenerationSettings


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


def test_concept101_arguments_reach_the_library(monkeypatch, tmp_path):
    seen = {}

    def fake(benchmark_dir, out_dir, **kwargs):
        seen.update(kwargs, benchmark_dir=benchmark_dir, out_dir=out_dir)
        return None

    monkeypatch.setattr("mipadapter.eval.api.evaluate_concept101", fake)
    (tmp_path / "b").mkdir()
    code = main(
        [
            "eval",
            "concept101",
            "--benchmark-dir",
            str(tmp_path / "b"),
            "--out",
            str(tmp_path / "o"),
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
    assert seen["settings"].negative_prompt == AUTHORS_NEGATIVE_PROMPT and seen["references"] == "crop"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "--steps must be an integer between 1 and 100, got 0"),
        (["--height", "50"], "--height must be a multiple of 8 between 8 and 1536 pixels, got 50"),
        (["--images-per-prompt", "0"], "--images-per-prompt must be an integer between 1 and 4, got 0"),
        # generate's caps (limits.py), with --allow-large's hint; the large caps still apply with it
        (["--steps", "101"], "--steps must be an integer between 1 and 100, got 101 (--allow-large allows up to 10000)"),
        (["--steps", "10001", "--allow-large"], "--steps must be an integer between 1 and 10000, got 10001"),
        (["--width", "1544"], "--width must be a multiple of 8 between 8 and 1536 pixels, got 1544 (--allow-large allows up to 8192)"),
        (["--height", "1536", "--width", "1536", "--allow-large", "--height", "8192", "--width", "8192"],
         "the output size 8192×8192 is 67.1 MP, above the limit of 16.8 MP"),
        (["--guidance", "31"], "--guidance must be a finite number between 0 and 30, got 31.0 (--allow-large allows up to 1000)"),
        (["--scale", "nan"], "--scale must be a finite number between 0 and 1.5, got nan"),
        (["--images-per-prompt", "5"], "--images-per-prompt must be an integer between 1 and 4, got 5 (--allow-large allows up to 64)"),
        # issue 18: one seed range, generate's, eval's and the web page's
        (["--seeds", "420,-1"], f"--seeds must be an integer between 0 and {2**64 - 1}, got -1"),
        (["--seeds", str(2**64)], f"--seeds must be an integer between 0 and {2**64 - 1}, got {2**64}"),
        (["--reference-boxes", "nowhere"], "--reference-boxes 'nowhere' is not a folder"),
        (
            ["--references", "whole", "--reference-boxes", "."],
            "--reference-boxes goes with --references crop",
        ),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_model(monkeypatch, tmp_path, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mipadapter.eval.api.evaluate_concept101", lambda *a, **k: pytest.fail("ran"))
    (tmp_path / "b").mkdir()
    code = main(["eval", "concept101", "--benchmark-dir", "b", "--out", "run", "--tiny", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().splitlines() == [f"mipadapter eval: error: {message}"]
    assert not any((tmp_path / "run").glob("*"))  # nothing written


def test_relevance_arguments_and_report(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(benchmark_dir, out_dir, **kwargs):
        seen.update(kwargs)
        return {"S_relevance": {"uniform": 1.0, "weighted": 2.0}, "detected": 1, "pairs": 1}

    monkeypatch.setattr("mipadapter.eval.api.evaluate_relevance", fake)
    (tmp_path / "b").mkdir()
    args = [
        "eval",
        "relevance",
        "--benchmark-dir",
        str(tmp_path / "b"),
        "--out",
        str(tmp_path / "r"),
        "--tiny",
    ]
    assert main(args) == 0 and seen["model"] == "base"
    assert main([*args, "--model", "adapter"]) == 0 and seen["model"] == "adapter"
    assert main([*args, "--reference-boxes", str(tmp_path)]) == 2
    assert "--reference-boxes goes with --model adapter" in capsys.readouterr().err


def test_report_prints_the_table(tmp_path, tiny_encoders, capsys):
    root = make_concept101(tmp_path / "c101")
    run_concept101(
        root,
        tmp_path / "run",
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=GenerationSettings(num_inference_steps=1),
        reference_boxes=root / "json_data",
    )
    assert main(["eval", "report", str(tmp_path / "run"), "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| run | official | 4 | 420 |" in out and "CLIP-T = 2.5" in out
    assert main(["eval", "report", str(tmp_path / "missing")]) == 2
    assert "results.json not found" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path / "run"), "--output", str(tmp_path / "no" / "r.md")]) == 2
    assert "--output" in capsys.readouterr().err and not (tmp_path / "no").exists()
    assert main(["eval", "report", str(tmp_path / "run"), "--output", str(tmp_path / "r.md")]) == 0
    assert "| run | official | 4 | 420 |" in (tmp_path / "r.md").read_text()
