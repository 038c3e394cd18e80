"""The one-layer benchmark runs on CPU: timing and operator counting (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "processor_layer.py"


@pytest.fixture(scope="module")
def processor_layer():
    spec = importlib.util.spec_from_file_location("benchmark_processor_layer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_counts_and_times_every_processor(processor_layer, capsys):
    assert processor_layer.main(["--count-ops", "--cases", "16x2:2:official,16x2:3:uniform"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    rows = {(line[0], line[1]): (int(line[2]), int(line[3])) for line in lines}
    assert set(rows) == {(case, name) for case in ("16x2:2:official", "16x2:3:uniform")
                         for name in ("text_only", "ip_concat", "ours")}  # fmt: skip
    for (case, _), (operators, kernels) in rows.items():
        assert 0 < kernels <= operators, case
    # the image branch only adds operators: every processor does at least what text-only does
    for case in ("16x2:2:official", "16x2:3:uniform"):
        assert rows[case, "ours"][1] > rows[case, "text_only"][1]
    assert processor_layer.main(["--cases", "16x2:2:official", "--rounds", "1", "--inner", "1"]) == 0
    assert "16x2:2:official" in capsys.readouterr().out
