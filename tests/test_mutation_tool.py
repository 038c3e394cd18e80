"""tools/mutants.py keeps mutation results across mutmut runs (mutmut forgets them when the tests change)
for as long as the mutated function is the same code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutants.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutants_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_function_of_a_mutant_is_its_name_without_the_mutant_number(tool):
    assert tool.function_of("mipadapter.recipe.x__shown__mutmut_12") == "mipadapter.recipe.x__shown"
    assert tool.function_of("mipadapter.a.xǁCǁm__mutmut_1") == "mipadapter.a.xǁCǁm"


def test_a_result_is_kept_until_its_function_changes(tool):
    hashes = {"m.x_f": "aaa", "m.x_g": "bbb"}
    first = tool.merge_history(
        {}, {"m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "survived", "m.x_g__mutmut_1": "not checked"}, hashes
    )
    assert first == {"m.x_f__mutmut_1": {"status": "killed", "hash": "aaa"},
                     "m.x_f__mutmut_2": {"status": "survived", "hash": "aaa"}}  # fmt: skip
    # the next run (tests changed) retests only the survivor; mutmut reports the others as not checked
    second = tool.merge_history(
        first, {"m.x_f__mutmut_1": "not checked", "m.x_f__mutmut_2": "killed", "m.x_g__mutmut_1": "timeout"}, hashes
    )
    assert {name: entry["status"] for name, entry in second.items()} == {
        "m.x_f__mutmut_1": "killed", "m.x_f__mutmut_2": "killed", "m.x_g__mutmut_1": "timeout",
    }  # fmt: skip
    # x_f was edited: its old results say nothing about the new code; a mutant gone is dropped too
    third = tool.merge_history(second, {"m.x_f__mutmut_1": "not checked", "m.x_g__mutmut_1": "not checked"},
                               {"m.x_f": "ccc", "m.x_g": "bbb"})  # fmt: skip
    assert third == {"m.x_g__mutmut_1": {"status": "timeout", "hash": "bbb"}}


def test_every_listed_equivalent_mutant_is_in_the_docs_with_its_reason(tool):
    """tools/equivalent_mutants.toml (the tool's list) and docs/testing.md (the reader's) say the same."""
    root = TOOL.parents[1]
    listed = tool.tomllib.loads((root / "tools" / "equivalent_mutants.toml").read_text(encoding="utf-8"))
    docs = (root / "docs" / "testing.md").read_text(encoding="utf-8").replace("`", "")
    missing = [
        name for name, why in listed.items()
        if f"- {name.rsplit('.', 1)[1]}: {why}" not in docs or f"\n{name.rsplit('.', 1)[0]}:\n" not in docs
    ]  # fmt: skip
    assert missing == []


def test_tests_that_pass_only_in_file_order_are_found_before_a_run(tool, tmp_path):
    """Guards the check before each module's run: mutmut runs a mutant's tests sorted by node id, so a
    test that passes only after another (accelerate's one precision per process did this) counted every
    mutant of training/step.py as killed. Tests that pass in any order are let through."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_order.py").write_text(
        "seen = []\n\n\ndef test_z_sets_up():\n    seen.append(1)\n\n\ndef test_a_needs_it():\n    assert seen\n"
    )
    (tmp_path / "tests" / "test_free.py").write_text("def test_b():\n    pass\n\n\ndef test_a():\n    pass\n")
    found = tool.order_dependence(["tests/test_order.py"], cwd=tmp_path, pytest_args=["-p", "no:cacheprovider"])
    assert found is not None and "test_a_needs_it" in found and "1 failed" in found
    assert tool.order_dependence(["tests/test_free.py"], cwd=tmp_path, pytest_args=["-p", "no:cacheprovider"]) is None
    assert "no tests" in tool.order_dependence(["tests/missing.py"], cwd=tmp_path, pytest_args=[])


def test_kept_results_are_committed_per_function_and_read_back_without_a_run(tool, tmp_path, monkeypatch):
    """The results kept across runs live in tools/mutant_results/ (committed): per function its hash,
    its number of mutants and the numbers of the tested ones by status. On a machine where mutmut has
    not run the module they are read back as they are, the never-tested mutants as not checked (what
    --resume runs)."""
    history = {
        "m.x_f__mutmut_1": {"status": "killed", "hash": "aaa"},
        "m.x_f__mutmut_3": {"status": "survived", "hash": "aaa"},
        "m.x_f__mutmut_10": {"status": "killed", "hash": "aaa"},
        "m.xǁCǁg__mutmut_2": {"status": "timeout", "hash": "bbb"},
    }
    found = {f"m.x_f__mutmut_{n}": "not checked" for n in range(1, 11)} | {"m.xǁCǁg__mutmut_1": "x", "m.xǁCǁg__mutmut_2": "x"}
    found |= {"m.x_h__mutmut_1": "not checked", "m.x_h__mutmut_2": "not checked"}  # a run stopped before h
    packed = tool.pack(history, found)
    assert packed == {
        "m.x_f": {"hash": "aaa", "mutants": 10, "killed": [1, 10], "survived": [3]},
        "m.xǁCǁg": {"hash": "bbb", "mutants": 2, "timeout": [2]},
        "m.x_h": {"mutants": 2},  # kept, or a later --resume would never test h (it did so once)
    }
    kept, every = tool.unpack(packed)
    assert kept == history and len(every) == 14
    assert every["m.x_f__mutmut_2"] == "not checked" and every["m.x_f__mutmut_3"] == "survived"
    assert every["m.x_h__mutmut_1"] == every["m.x_h__mutmut_2"] == "not checked"

    monkeypatch.setattr(tool, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(tool, "WORK", tmp_path / "build")  # no mutmut folder: never run here
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "web.handler.json").write_text(tool.json.dumps(packed), encoding="utf-8")
    assert tool.statuses("web/handler.py") == every
    assert tool.summary("web/handler.py", {})["survivors"] == {"m.x_f__mutmut_3": "survived"}
