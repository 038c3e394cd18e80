"""Mutation testing, one module at a time (docs/testing.md).

    nice -n 15 python tools/mutants.py [MODULE ...] [--max-children N] [--report]

For each MODULE of the test map in pyproject.toml (``[tool.mipadapter.mutants]``: a file or folder of
src/mipadapter and the tests that exercise it; all of them when none is named), mutmut runs in its own
folder, build/mutants/<module>/, with only that module mutated and only its tests selected; within those,
each mutant runs only the tests that call the mutated function. The shared settings are pyproject's
``[tool.mutmut]``. Results are cached there (a rerun retests only the functions that changed), and kept
in tools/mutant_results/<module>.json (committed, so a run on another machine goes on from them) while
the function a mutant changed stays the same: mutmut itself forgets every earlier result when the tests
change.

Afterwards one table row per module is printed, ready for docs/testing.md: mutants, tested (fewer when
a run was stopped), killed (timeouts included), equivalent (tools/equivalent_mutants.toml, each with its
reason), survived (surviving or not reached by the module's tests) and the kill rate over the tested
non-equivalent ones; then the survivors not
known to be equivalent, to be killed by a test (``mutmut show NAME`` in the module's folder shows one).
--retest tests again only the survivors of earlier runs (after tests were added to kill them); --resume
only the mutants no run has tested yet (a run stopped before the end goes on from there); --report
prints the table of what earlier runs left, running nothing; --show adds each survivor's diff; --only
PATTERN tests only the mutants whose names match (the functions that matter first, on a slow machine).
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutants"
EQUIVALENT_FILE = ROOT / "tools" / "equivalent_mutants.toml"
RESULTS = ROOT / "tools" / "mutant_results"  # the results kept, committed: <module slug>.json
KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # the tests (or a limit) stopped it
UNTESTED = {"not checked", "check was interrupted by user"}  # a run stopped before it reached them


def load_project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def slug(module: str) -> str:
    """``training/step.py`` → ``training.step`` (a folder name)."""
    return module.removesuffix(".py").replace("/", ".")


def mutate_pattern(module: str) -> str:
    path = f"src/mipadapter/{module}"
    return path if module.endswith(".py") else f"{path}/*"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


def module_pyproject(module: str, tests: list[str]) -> str:
    """pyproject.toml of a module's folder: the project's, with [tool.mutmut] narrowed to the module."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
    settings = {
        **load_project()["tool"]["mutmut"],
        "only_mutate": [mutate_pattern(module)],
        "pytest_add_cli_args_test_selection": tests,
    }
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    return text.rstrip() + "\n\n[tool.mutmut]\n" + "\n".join(lines) + "\n"


def prepare(module: str, tests: list[str]) -> Path:
    """build/mutants/<module>/ with src, tests and configs linked and the narrowed pyproject.toml."""
    folder = WORK / slug(module)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("src", "tests", "configs"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name, target_is_directory=True)
    (folder / "pyproject.toml").write_text(module_pyproject(module, tests), encoding="utf-8")
    return folder


def order_dependence(tests: list[str], cwd: Path = ROOT, pytest_args: list[str] | None = None) -> str | None:
    """The end of pytest's output when ``tests`` fail run one by one sorted by node id (as mutmut runs a
    mutant's tests, not in file order); None when they pass so. A test that passes only after another
    would make mutmut count every mutant reaching it as killed, whatever the mutant does."""
    if pytest_args is None:
        pytest_args = load_project()["tool"]["mutmut"]["pytest_add_cli_args"]
    env = {**os.environ, "PYTHONPATH": "src", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", *pytest_args]
    listed = subprocess.run([*base, "--collect-only", *tests], cwd=cwd, env=env, capture_output=True, text=True)
    ids = sorted({line.strip() for line in listed.stdout.splitlines() if "::" in line})
    if listed.returncode or not ids:
        return (listed.stdout + listed.stderr)[-2000:] or "no tests collected"
    ran = subprocess.run([*base, "-x", *ids], cwd=cwd, env=env, capture_output=True, text=True)
    return None if ran.returncode == 0 else (ran.stdout + ran.stderr)[-2000:]


def run(module: str, tests: list[str], max_children: int, names: list[str]) -> int:
    folder = prepare(module, tests)
    env = {
        **os.environ,
        "PYTHONPATH": "src",  # relative: mutmut runs the tests in mutants/, so its copy is imported
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    log = folder / "mutmut.log"
    print(f"== {module}: mutmut run in {folder.relative_to(ROOT)} (log: {log.relative_to(ROOT)})", flush=True)
    command = [mutmut, "run", "--max-children", str(max_children), *names]
    with log.open("w") as out:
        code = subprocess.call(command, cwd=folder, env=env, stdout=out, stderr=out)
    if code:
        tail = "".join(log.read_text().splitlines(True)[-15:])
        print(f"   mutmut exited with {code}; the end of its log:\n{tail}")
    return code


def meta_results(module: str) -> tuple[dict[str, str], dict[str, str]]:
    """(mutant name → mutmut's status, function name → its source hash), from the module folder's meta
    files (both empty when never run)."""
    found, hashes = {}, {}
    base = WORK / slug(module) / "mutants" / "src" / "mipadapter"
    target = base / module
    metas = [Path(str(target) + ".meta")] if module.endswith(".py") else sorted(target.rglob("*.py.meta"))
    for meta in metas:
        if meta.is_file():
            from mutmut.stats import status_by_exit_code  # only where mutmut has run: --report needs none
            data = json.loads(meta.read_text())
            found.update({name: status_by_exit_code[code] for name, code in data["exit_code_by_key"].items()})
            prefix = meta.relative_to(base.parent).with_suffix("").with_suffix("").as_posix().replace("/", ".")
            hashes.update({f"{prefix}.{name}": digest for name, digest in data["hash_by_function_name"].items()})
    return found, hashes


def function_of(name: str) -> str:
    """The mutated function's qualified name: ``pkg.mod.x_f__mutmut_3`` → ``pkg.mod.x_f``."""
    return name.rsplit("__mutmut_", 1)[0]


def merge_history(
    history: dict[str, dict[str, str]], found: dict[str, str], hashes: dict[str, str]
) -> dict[str, dict[str, str]]:
    """The results worth keeping: ``history`` (name → {status, hash}) updated with every mutant ``found``
    tested now, less those whose function has changed (its hash differs, or it is gone).

    mutmut forgets every earlier result when the tests change (each run after adding a test would
    otherwise count only what it retested); a result stays valid while the function it mutated is the
    same code."""
    merged = {
        name: entry
        for name, entry in history.items()
        if name in found and entry["hash"] == hashes.get(function_of(name))
    }
    for name, status in found.items():
        if status not in UNTESTED and function_of(name) in hashes:
            merged[name] = {"status": status, "hash": hashes[function_of(name)]}
    return merged


def pack(history: dict[str, dict[str, str]], found: dict[str, str]) -> dict:
    """The kept results in the committed form: per function its hash, its number of mutants (``found``
    holds them all, tested or not) and the numbers of its tested mutants by status."""
    totals = Counter(function_of(name) for name in found)
    # a function none of whose mutants was tested is kept too: a later --resume must know it has them
    packed: dict[str, dict] = {function: {"mutants": count} for function, count in totals.items()}
    for name, entry in sorted(history.items()):
        function, number = name.rsplit("__mutmut_", 1)
        record = packed[function]  # merge_history keeps only mutants of functions found
        record.setdefault("hash", entry["hash"])
        record.setdefault(entry["status"], []).append(int(number))
    for record in packed.values():
        for value in record.values():
            if isinstance(value, list):
                value.sort()
    return packed


def unpack(packed: dict) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(name → {status, hash} of the tested mutants, name → status of every mutant, "not checked" for
    those never tested) from the committed form."""
    history, every = {}, {}
    for function, record in packed.items():
        for number in range(1, record["mutants"] + 1):
            every[f"{function}__mutmut_{number}"] = "not checked"
        for status, numbers in record.items():
            if isinstance(numbers, list):
                for number in numbers:
                    name = f"{function}__mutmut_{number}"
                    history[name] = {"status": status, "hash": record["hash"]}
                    every[name] = status
    return history, every


def statuses(module: str) -> dict[str, str]:
    """Mutant name → status: mutmut's latest where it tested the mutant, else the one kept from an earlier
    run of the same function (tools/mutant_results/<module>.json, committed, updated here). Where mutmut
    has not run the module on this machine, the kept results as they are (a run checks their hashes)."""
    found, hashes = meta_results(module)
    path = RESULTS / f"{slug(module)}.json"
    history, every = unpack(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else ({}, {})
    if not found:
        return every
    history = merge_history(history, found, hashes)
    RESULTS.mkdir(parents=True, exist_ok=True)
    packed = pack(history, found)  # one line per function: a rerun's diff shows the functions it changed
    lines = (f"{json.dumps(name)}: {json.dumps(packed[name], sort_keys=True)}" for name in sorted(packed))
    text = "{\n" + ",\n".join(lines) + "\n}\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return {name: history[name]["status"] if name in history else status for name, status in found.items()}


def summary(module: str, equivalent: dict[str, str]) -> dict:
    found = statuses(module)
    counts = Counter(found.values())
    tested = {name: status for name, status in found.items() if status not in UNTESTED}
    known = {name for name in tested if name in equivalent}
    stale = sorted(name for name in known if tested[name] in KILLED)  # listed, but a test now kills it
    equivalent_here = len(known) - len(stale)
    killed = sum(1 for status in tested.values() if status in KILLED)
    survivors = sorted(n for n, s in tested.items() if s not in KILLED and n not in equivalent)
    counted = len(tested) - equivalent_here
    return {
        "module": module,
        "mutants": len(found),
        "tested": len(tested),
        "killed": killed,
        "equivalent": equivalent_here,
        "survived": len(survivors),
        "rate": killed / counted if counted else None,
        "statuses": dict(counts),
        "survivors": {n: tested[n] for n in survivors},
        "stale_equivalents": stale,
    }


def print_table(rows: list[dict], date: str, tool: str) -> None:
    print("\n| module | date | tool | mutants | tested | killed | equivalent | survived | kill rate |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        if not row["tested"]:
            print(f"| {row['module']} | — | — | not run yet | | | | | |")
            continue
        rate = "—" if row["rate"] is None else f"{100 * row['rate']:.1f} %"
        print(f"| {row['module']} | {date} | {tool} | {row['mutants']} | {row['tested']} | {row['killed']} | "
              f"{row['equivalent']} | {row['survived']} | {rate} |")  # fmt: skip
    for row in rows:
        for name, status in row["survivors"].items():
            print(f"   {status}: {name}")
        for name in row["stale_equivalents"]:
            print(f"   listed as equivalent but killed now (remove it from {EQUIVALENT_FILE.name}): {name}")


def show(module: str, names) -> None:
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    for name in names:
        folder = WORK / slug(module)
        shown = subprocess.run([mutmut, "show", name], cwd=folder, capture_output=True, text=True)
        print(shown.stdout.rstrip() or shown.stderr.rstrip(), flush=True)


def main(argv: list[str] | None = None) -> int:
    test_map = load_project()["tool"]["mipadapter"]["mutants"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"of: {', '.join(test_map)}")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--report", action="store_true", help="only print the table of earlier runs")
    parser.add_argument("--show", action="store_true", help="also print each survivor's diff (mutmut show)")
    parser.add_argument("--retest", action="store_true", help="test again only the survivors of earlier runs")
    parser.add_argument(
        "--resume", action="store_true",
        help="test only the mutants no earlier run has tested (a stopped run, or one whose tests changed)",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", default=[], metavar="PATTERN",
        help="test only the mutants whose names match (fnmatch, e.g. '*x_build_sample__*'; repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in test_map]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}; pyproject.toml's test map has {', '.join(test_map)}")
    modules = args.modules or list(test_map)
    equivalent = {}
    if EQUIVALENT_FILE.is_file():
        equivalent = tomllib.loads(EQUIVALENT_FILE.read_text(encoding="utf-8"))
    failed = []
    if not args.report:
        for module in modules:
            known = statuses(module)  # keep what the last run found: mutmut forgets it when the tests changed
            names = list(summary(module, equivalent)["survivors"]) if args.retest else []
            resumed = args.resume and bool(known)  # a module never run is run whole
            if resumed:
                names += sorted(name for name, status in known.items() if status in UNTESTED)
            if (args.retest or resumed) and not names:
                continue
            if args.only:
                chosen = args.retest or resumed
                names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in args.only)] if chosen else args.only
            print(f"== {module}: its tests sorted by name, as mutmut runs them", flush=True)
            dependence = order_dependence(test_map[module])
            if dependence is not None:
                print(f"   they fail so (every mutant would count as killed); not run:\n{dependence}")
                failed.append(module)
                continue
            if run(module, test_map[module], args.max_children, names):
                failed.append(module)
    rows = [summary(module, equivalent) for module in modules]
    for row in rows:
        (WORK / slug(row["module"])).mkdir(parents=True, exist_ok=True)
        (WORK / slug(row["module"]) / "summary.json").write_text(json.dumps(row, indent=1) + "\n")
    print_table(rows, datetime.date.today().isoformat(), f"mutmut {metadata.version('mutmut')}")
    if args.show:
        for row in rows:
            show(row["module"], row["survivors"])
    if failed:
        print(f"mutmut failed on: {', '.join(failed)} (see their mutmut.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
