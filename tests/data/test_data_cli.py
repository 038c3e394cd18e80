"""`mipadapter data ...` and `python -m mipadapter.data ...`: parsing, one library call, readable errors."""

from __future__ import annotations

import json

import pytest
from data_fakes import fake_backends

import mipadapter.cli.data as data_cli
import mipadapter.data.backends as backends_module
from mipadapter.cli.main import build_parser
from mipadapter.cli.main import main as mipadapter_main
from mipadapter.data.__main__ import main as data_main
from mipadapter.manifest import read_manifest


@pytest.fixture
def fake_models(monkeypatch):
    """The CLI loads models through load_backends: hand it the fakes, remember what it was asked for."""
    calls = []

    def load(config, device, stages=backends_module.STAGES):
        calls.append((config, device, stages))
        return fake_backends()

    monkeypatch.setattr(backends_module, "load_backends", load)
    # the models' identities (Hub ids, not cached here): their names stand for them
    monkeypatch.setattr(
        data_cli, "_identities", lambda config, keys, tiny: {key: {"source": getattr(config, key)} for key in keys}
    )
    return calls


def test_the_data_command_is_registered():
    args = build_parser().parse_args(
        ["data", "build", "--input", "in", "--output", "out", "--top-k", "5", "--mode", "single"]
    )
    assert (args.command, args.verb, args.top_k, args.mode, args.layout) == (
        "data",
        "build",
        5,
        "single",
        "auto",
    )
    assert callable(args.func)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["data", "score", "--help"])
    assert exit_info.value.code == 0


def test_build_through_python_dash_m(sa1b, tmp_path, fake_models, capsys):
    out = tmp_path / "out"
    code = data_main(
        [
            "build",
            "--input",
            str(sa1b),
            "--output",
            str(out),
            "--top-k",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0
    ((config, device, stages),) = fake_models
    assert (
        device == "cpu" and config.top_k == 3 and config.batch_size == 2 and stages == backends_module.STAGES
    )
    printed = capsys.readouterr().out
    assert (
        "scored: 6, selected: 3" in printed
        and "corrupt_image=1" in printed
        and "truncated_member=1" in printed
    )
    assert len(read_manifest(out / "selected.jsonl")) == 3
    # merge again with another K, from the run's own record of what it was
    assert mipadapter_main(["data", "merge", "--output", str(out), "--top-k", "1"]) == 0
    assert len(json.loads((out / "selection.json").read_text())["rankings"]["s_quality"]) == 1


def test_the_score_verb_loads_only_clip(tmp_path, fake_models):
    for sub in ("images", "masks", "jsons"):
        (tmp_path / "set" / sub).mkdir(parents=True)
    (tmp_path / "set" / "jsons" / "1.json").write_text("{}")
    code = data_main(
        [
            "score",
            "--input",
            str(tmp_path / "set"),
            "--output",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 0 and fake_models[0][2] == ("clip",)


def test_errors_are_one_line(tmp_path, fake_models, capsys):
    code = mipadapter_main(
        [
            "data",
            "build",
            "--input",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "bad.yaml").write_text("top_kk: 3\n")
    assert (
        data_main(
            [
                "build",
                "--input",
                str(tmp_path),
                "--output",
                str(tmp_path / "o"),
                "--config",
                str(tmp_path / "bad.yaml"),
            ]
        )
        == 2
    )
    assert "unknown key(s) in DataConfig: ['top_kk']" in capsys.readouterr().err


def test_without_a_device_accelerate_decides(sa1b, tmp_path, fake_models):
    """The `accelerate launch` path: rank, world size and device come from PartialState (one process here)."""
    assert data_main(["build", "--input", str(sa1b), "--output", str(tmp_path / "o"), "--no-progress"]) == 0
    from accelerate import PartialState

    assert fake_models[0][1] == PartialState().device


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build", "--input", "{tmp}/none", "--output", "{tmp}/out"], "--input '{tmp}/none' does not exist"),
        (
            ["build", "--input", "{tmp}", "--output", "{tmp}/file"],
            "--output '{tmp}/file' is a file; give a folder",
        ),
        (
            ["build", "--input", "{tmp}", "--output", "{tmp}/out", "--top-k", "0"],
            "--top-k must be >= 1, got 0",
        ),
        (
            ["build", "--input", "{tmp}", "--output", "{tmp}/out", "--batch-size", "0"],
            "--batch-size must be >= 1, got 0",
        ),
        (
            ["build", "--input", "{tmp}", "--output", "{tmp}/out", "--config", "{tmp}/c.yaml"],
            "--config '{tmp}/c.yaml' is not a file",
        ),
        (
            ["score", "--input", "{tmp}", "--output", "{tmp}/out", "--ids", "{tmp}/ids.txt"],
            "--ids '{tmp}/ids.txt' is not a file",
        ),
        (["merge", "--output", "{tmp}/none"], "--output '{tmp}/none' is not the folder of a data run"),
    ],
)
def test_bad_flags_fail_in_one_line_before_any_model(tmp_path, capsys, fake_models, args, message):
    (tmp_path / "file").write_text("x")
    code = data_main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"mipadapter data: error: {message.format(tmp=tmp_path)}"]
    assert fake_models == [] and not (tmp_path / "out").exists()
