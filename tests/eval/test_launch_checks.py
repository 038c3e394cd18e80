"""`accelerate launch` on CPUs: a launch that runs one process says so, one whose processes each see only
themselves is refused before any work (issue 17, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from eval_fakes import make_concept101

from mipadapter.launching import CPU_FORM, check_process_count, several_processes_note

SIMPLE = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_the_simple_launcher_with_several_processes_is_noted():
    assert "started one (no --multi_gpu)" in several_processes_note(SIMPLE)
    assert several_processes_note({}) is None  # not launched by accelerate
    assert several_processes_note({**SIMPLE, "WORLD_SIZE": "2"}) is None  # a real multi-process launch


def test_processes_that_each_see_only_themselves_are_refused():
    check_process_count(2, {"WORLD_SIZE": "2"})
    check_process_count(1, {})
    with pytest.raises(RuntimeError, match="accelerate launched 3 processes, but each sees only itself"):
        check_process_count(1, {"WORLD_SIZE": "3"})


def _launch(tmp_path, *launcher):
    root = make_concept101(tmp_path / "c101")
    for path in (root / "prompts").glob("*.txt"):
        path.write_text(path.read_text().splitlines()[0] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "mipadapter.eval", "concept101", "--benchmark-dir", str(root), "--reference-boxes",
        str(root / "json_data"), "--tiny", "--steps", "1", "--device", "cpu", "--no-score", "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_a_launch_without_multi_gpu_runs_one_process_and_says_so(tmp_path):
    done = _launch(tmp_path, "--num_processes", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if "accelerate launch was asked" in line]
    assert len(notes) == 1 and CPU_FORM in notes[0]
    assert len(list((tmp_path / "run" / "images").rglob("*.png"))) == 2  # the whole job, once


def test_multi_gpu_on_cpus_without_use_cpu_is_refused_before_any_image(tmp_path):
    done = _launch(tmp_path, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29541")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors and all("each sees only itself" in line and CPU_FORM in line for line in errors)
    assert not list(tmp_path.glob("run/images/**/*.png"))
