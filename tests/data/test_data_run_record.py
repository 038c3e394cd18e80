"""`mipadapter data build` knows its models and its settings (issue 17, items 1, 3 and 6), through the CLI:
``--tiny`` offline, other models or settings refused in one line with nothing written, ``--allow-change``,
a run with no finished shard started again freely, and offline failures that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mipadapter.cli.main import main
from mipadapter.manifest import read_manifest

SHAPES = Path(__file__).resolve().parents[1] / "assets" / "shapes"


def build(out, *extra):
    return main(["data", "build", "--input", str(SHAPES), "--output", str(out), "--no-progress", *extra])


def tree(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"mipadapter data: error: {expected}"], err


def config_file(folder, **values):
    path = folder / f"data-{len(list(folder.glob('data-*.yaml')))}.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


@pytest.fixture
def built(tmp_path):
    out = tmp_path / "out"
    assert build(out, "--tiny") == 0
    return out


def test_tiny_build_runs_the_real_stages_offline(built, monkeypatch):
    records = read_manifest(built / "selected.jsonl")
    assert len(records) == 8
    names = {frozenset(o.name for o in r.objects) for r in records}
    assert frozenset({"apple", "frog"}) in names and all(len(n) == 2 for n in names)
    assert all(-1 <= o.clip_score <= 1 for r in records for o in r.objects)  # the tiny CLIP's scores
    run = json.loads((built / "run.json").read_text())
    assert run["models"]["clip_model"] == {"tiny": "clip", "seed": 0}
    assert run["models"]["caption_model"] == {"tiny": "shape captioner"} and run["changes"] == []


def test_other_settings_are_refused_in_one_line_unless_allowed(built, tmp_path, capsys):
    before = tree(built)
    capsys.readouterr()
    changed = config_file(tmp_path, box_threshold=0.5, filters={"min_score": 0.4})
    code = build(built, "--tiny", "--config", str(changed))
    one_line(
        capsys, code,
        f"output folder '{built}' holds a run with other settings (box_threshold: 0.3 → 0.5; filters.min_score: "
        "0.3 → 0.4): rerun with the same settings, allow them with --allow-change KEY (for the shards not "
        "finished yet), or use a new --output",
    )  # fmt: skip
    code = build(built, "--tiny", "--config", str(changed), "--allow-change", "box_threshold")
    assert code == 2 and "(filters.min_score: 0.3 → 0.4)" in capsys.readouterr().err
    code = build(built, "--tiny", "--allow-change", "box_threshold")
    one_line(capsys, code, "--allow-change box_threshold: that setting is the same as the run's (0.3)")
    assert tree(built) == before
    code = build(built, "--tiny", "--config", str(changed), "--allow-change", "box_threshold",
                 "--allow-change", "filters.min_score")  # fmt: skip
    assert code == 0
    run = json.loads((built / "run.json").read_text())
    assert run["config"]["box_threshold"] == 0.5 and run["config"]["filters"]["min_score"] == 0.4
    assert run["changes"] == [
        {"key": "box_threshold", "old": 0.3, "new": 0.5, "shards_done": ["files_00000"]},
        {"key": "filters.min_score", "old": 0.3, "new": 0.4, "shards_done": ["files_00000"]},
    ]


def test_other_models_are_refused_before_any_is_loaded(built, tmp_path, capsys):
    folders = {}
    for key in ("caption_model", "grounding_model", "segment_model", "clip_model"):
        folders[key] = tmp_path / key
        folders[key].mkdir()
        (folders[key] / "config.json").write_text("{}")  # found and fingerprinted, never loaded
    before = tree(built)
    capsys.readouterr()
    code = build(built, "--config", str(config_file(tmp_path, **{k: str(v) for k, v in folders.items()})))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(
        f"mipadapter data: error: run folder '{built}' was made with caption model tiny shape captioner, "
        f"this call gives {folders['caption_model']} (fingerprint "
    )
    assert tree(built) == before


def test_a_run_without_a_finished_shard_starts_again_with_new_settings(built, tmp_path):
    for done in (built / "shards").glob("*.done.json"):
        done.unlink()  # as if it was stopped inside its only shard
    changed = config_file(tmp_path, mode="single", top_k=3)
    assert build(built, "--tiny", "--config", str(changed)) == 0
    run = json.loads((built / "run.json").read_text())
    assert run["config"]["mode"] == "single" and run["changes"] == []
    assert len(read_manifest(built / "selected.jsonl")) == 3


def test_offline_a_missing_model_fails_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "hub"
    empty.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(empty))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    out = tmp_path / "out"
    code = build(out)
    one_line(
        capsys, code,
        "could not fetch the captioner (BLIP-2) 'Salesforce/blip2-opt-2.7b' from the Hugging Face Hub (not in "
        "the local cache and HF_HUB_OFFLINE is set); download it where you have network and point "
        "caption_model at a local copy",
    )  # fmt: skip
    assert not out.exists()


def test_a_local_copy_that_does_not_load_is_not_said_to_come_from_the_hub(tmp_path, capsys):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")  # a config but no weights
    out = tmp_path / "out"
    code = main(["data", "build", "--input", str(SHAPES), "--output", str(out), "--no-progress", "--device", "cpu",
                 "--config", str(config_file(tmp_path, **{k: str(clip) for k in (
                     "caption_model", "grounding_model", "segment_model", "clip_model")}))])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"mipadapter data: error: could not load the captioner (BLIP-2) '{clip}' (")
    assert err[0].endswith("point caption_model in the data config (--config) at a complete copy of the model")
    assert "Hub" not in err[0]


def test_tiny_score_uses_the_tiny_clip_and_records_it(tmp_path):
    from test_data_score import write_authors_item

    root = tmp_path / "set"
    for sub in ("images", "masks", "jsons"):
        (root / sub).mkdir(parents=True)
    write_authors_item(root, "00001", ("apple", "frog"))
    write_authors_item(root, "00002", ("car", "banana"))
    out = tmp_path / "scored"
    assert main(["data", "score", "--tiny", "--input", str(root), "--output", str(out), "--no-progress"]) == 0
    assert json.loads((out / "run.json").read_text())["models"] == {"clip_model": {"tiny": "clip", "seed": 0}}
    records = read_manifest(out / "manifest.jsonl")
    assert [r.id for r in records] == ["00001", "00002"]
    scores = [o.clip_score for r in records for o in r.objects]
    assert len(scores) == 4 and len(set(scores)) == 4 and all(-1 <= s <= 1 for s in scores)  # a real CLIP's
