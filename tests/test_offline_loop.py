"""README's "The whole loop offline" runs verbatim: data build → train → eval → report, tiny models, no network.

The block between ``<!-- offline-loop -->`` and ``<!-- /offline-loop -->`` is taken from README.md as it
stands and run with bash in a copy of the repository's tracked inputs (``configs/``, ``tests/assets/``),
with ``mipadapter`` on the PATH running this checkout and the Hub switched off, so the README cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mipadapter.provenance import file_sha256

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^<!-- offline-loop -->\n```bash\n(.*?)^```\n<!-- /offline-loop -->$", re.S | re.M)


def offline_loop_block() -> str:
    found = BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(found) == 1, "README.md must hold one offline-loop bash block"
    return found[0]


def copy_inputs(target: Path) -> None:
    """The block's inputs as a clean checkout has them: git's tracked files (else the folders as they are)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "configs", "tests/assets"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for d in ("configs", "tests/assets") for p in (ROOT / d).rglob("*") if p.is_file()]
    for name in listed:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)


def test_readme_block_is_commands_only():
    block = offline_loop_block()
    commands = [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [
        ["mipadapter", "data"], ["mipadapter", "train"], ["mipadapter", "eval"], ["mipadapter", "eval"],
    ]  # fmt: skip
    assert all("runs/offline" in c for c in commands)  # one output folder, which .gitignore covers
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()


@pytest.mark.slow
def test_the_offline_loop_runs_verbatim(tmp_path):
    copy_inputs(tmp_path)
    shim = tmp_path / "bin" / "mipadapter"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m mipadapter "$@"\n')
    shim.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", offline_loop_block()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = tmp_path / "runs" / "offline"
    assert len((runs / "data" / "selected.jsonl").read_text().splitlines()) == 8
    trained = runs / "train" / "export" / "mip_adapter.safetensors"
    record = json.loads((runs / "train" / "config.json").read_text())
    assert record["models"]["base_model"]["tiny"] == "sdxl" and record["optim"]["max_steps"] == 4
    models = json.loads((runs / "eval" / "run.json").read_text())["models"]
    assert models["mip.adapter"] == {"source": str(trained.resolve()), "sha256": file_sha256(trained)}
    assert models["mip.base_model"]["tokenizer"] == record["models"]["base_model"]["tokenizer"]
    assert "| eval | official | 4 |" in done.stdout  # the report's row: four images, one per subject
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "configs", "runs", "tests"]  # nothing else
