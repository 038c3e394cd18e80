"""A training run knows what it ran on and what changed (issue 17, items 1, 3, 4, 5, 6, 10), through the CLI:
``--tiny``, the models' record and its refusal, ``--allow-change`` (the optimiser really takes the new
rate), fp16 on a CPU, one report for several processes, and the one-line refusals that write nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from synthetic_data import write_authors_layout

import mipadapter.train as train_entry
from mipadapter.checkpoint import read_file
from mipadapter.cli.main import main
from mipadapter.launching import CPU_FORM
from mipadapter.training import checkpointing as ckpt
from mipadapter.training.metrics import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("record") / "data"
    write_authors_layout(root, 6)
    return root


def write_config(folder, data, **optim):
    optim = {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "mixed_precision": "no", **optim}
    config = {
        "model": {"base_model": "unused/with-tiny", "image_encoder": "unused/with-tiny", "adapter_init": None,
                  "train_image_proj": True},
        "data": {"root": str(data), "resolution": 64, "max_subjects": 3, "num_workers": 0, "scan_workers": 1},
        "optim": optim,
        "run": {"output_dir": str(folder / "run"), "checkpoint_every": 1, "keep_last": 5, "log_every": 1,
                "progress_bar": False, "tensorboard": False},
    }  # fmt: skip
    path = folder / "train.json.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def train(config, *extra):
    return main(["train", "--config", str(config), "--tiny", *extra])


def tree(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, code, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"mipadapter train: error: {expected}"], err


def adapter_at(run, step):
    return read_file(run / "checkpoints" / f"step-{step:08d}" / ckpt.ADAPTER_FILE).state


def test_a_changed_setting_is_refused_in_one_line_and_changes_nothing(tmp_path, data, capsys):
    config = write_config(tmp_path, data)
    assert train(config, "--stop-after", "1") == 0
    before = tree(tmp_path / "run")
    capsys.readouterr()
    code = train(config, "--set", "optim.learning_rate=0.5", "--set", "optim.drop_text=0.2")
    one_line(
        capsys, code,
        f"run.output_dir '{tmp_path / 'run'}' holds a run with other settings (optim.drop_text: 0.05 → 0.2; "
        "optim.learning_rate: 0.001 → 0.5): restore them, allow them with --allow-change KEY (from the step "
        "it resumes at), or use a new run.output_dir",
    )  # fmt: skip
    assert tree(tmp_path / "run") == before
    # allowing one of two changes is not enough; a setting a run cannot change is refused even when allowed
    code = train(config, "--set", "optim.learning_rate=0.5", "--set", "optim.drop_text=0.2",
                 "--allow-change", "optim.learning_rate")  # fmt: skip
    assert code == 2 and "(optim.drop_text: 0.05 → 0.2)" in capsys.readouterr().err
    code = train(config, "--set", "data.resolution=128", "--allow-change", "data.resolution")
    one_line(
        capsys, code,
        "--allow-change data.resolution: a run cannot change it (64 → 128; the checkpoint's weights and the "
        "built index depend on it): use a new run.output_dir",
    )
    code = train(config, "--allow-change", "optim.learning_rate")
    one_line(capsys, code, "--allow-change optim.learning_rate: that setting is the same as the run's (0.001)")
    assert tree(tmp_path / "run") == before


def test_an_allowed_learning_rate_drives_the_optimizer_from_the_resumed_step(tmp_path, data, capsys):
    straight, changed = tmp_path / "straight", tmp_path / "changed"
    for folder in (straight, changed):
        folder.mkdir()
        assert train(write_config(folder, data), "--stop-after", "1") == 0
    assert train(write_config(straight, data)) == 0
    capsys.readouterr()
    assert train(write_config(changed, data, learning_rate=0.5), "--allow-change", "optim.learning_rate") == 0
    err = capsys.readouterr().err.splitlines()
    assert "resuming from step 1 (" in err[0] and err[1] == "from step 1: optim.learning_rate 0.001 → 0.5"
    # step 2 starts from the same weights, moments and batch in both runs: AdamW's step (decay included)
    # is proportional to the rate, so the changed run moves each weight 500 times as far (up to 500 times
    # the float32 rounding of the straight run's small steps)
    a1, a2 = adapter_at(straight / "run", 1), adapter_at(straight / "run", 2)
    b1, b2 = adapter_at(changed / "run", 1), adapter_at(changed / "run", 2)
    assert a1.keys() == b1.keys()
    for key in a1:
        assert torch.equal(a1[key], b1[key])
        torch.testing.assert_close(b2[key] - b1[key], 500 * (a2[key] - a1[key]), rtol=2e-3, atol=2e-5)
    record = json.loads((changed / "run" / "config.json").read_text())
    assert record["optim"]["learning_rate"] == 0.5
    assert record["changes"] == [{"step": 1, "key": "optim.learning_rate", "old": 0.001, "new": 0.5}]
    rows = read_metrics(changed / "run")
    assert rows[1] == {"step": 1, "changes": [{"key": "optim.learning_rate", "old": 0.001, "new": 0.5}]}
    assert [(r["step"], r["lr"]) for r in rows if "lr" in r] == [(1, 0.001), (2, 0.5)]


def test_resuming_with_other_models_is_refused_before_any_model_is_built(tmp_path, data, capsys, monkeypatch):
    config = write_config(tmp_path, data, mixed_precision="fp16")
    assert train(config, "--stop-after", "1") == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "mixed_precision" in line]
    # fp16 on a CPU: the run trains in bf16 and says so once (beside the data's skip report); the record says what ran
    assert err == [
        "optim.mixed_precision: fp16 cannot train on a CPU; this run uses bf16 (set optim.mixed_precision: "
        "bf16 or no to say so)"
    ]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["optim"]["mixed_precision"] == "bf16"
    base = record["models"]["base_model"]
    assert base["tiny"] == "sdxl" and base["seed"] == 0 and len(base["tokenizer"]) == 16
    assert record["models"]["image_encoder"] == {"tiny": "sdxl basic image encoder", "seed": 0}
    before = tree(tmp_path / "run")

    def no_models(*args):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr(train_entry, "tiny_components", no_models)
    code = train(config, "sd15")
    one_line(
        capsys, code,
        f"run folder '{tmp_path / 'run'}' was made with base model tiny sdxl (tokenizer {base['tokenizer']}), "
        f"this call gives tiny sd15 (tokenizer {base['tokenizer']})",
    )  # fmt: skip
    code = main(["train", "--config", str(config)])  # the real models named by the config
    assert code == 2 and "model.base_model" in capsys.readouterr().err  # not on disk here: named, nothing loads
    assert tree(tmp_path / "run") == before


def _launch(tmp_path, config, *launcher, use_cpu):
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mipadapter.train", "--config", str(config),
        "--tiny",
    ]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_cpu_processes_train_once_and_report_once(tmp_path, data):
    config = write_config(tmp_path, data, batch_size=1)
    done = _launch(tmp_path, config, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29571",
                   use_cpu=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("finished at step 2") == 1  # the main process reports for both
    assert json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / ckpt.STATE_FILE).read_text())[
        "world_size"
    ] == 2
    assert "torch_dtype" not in done.stderr and "should be kept in float32" not in done.stderr


def test_processes_that_each_see_only_themselves_are_refused_before_writing(tmp_path, data):
    config = write_config(tmp_path, data)
    done = _launch(tmp_path, config, "--multi_gpu", "--num_processes", "2", "--main_process_port", "29572",
                   use_cpu=False)  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors and all("each sees only itself" in line and CPU_FORM in line for line in errors)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def shapes_manifest(tmp_path_factory):
    """The manifest `mipadapter data build --tiny` makes of tests/assets/shapes."""
    out = tmp_path_factory.mktemp("shapes") / "set"
    shapes = Path(__file__).resolve().parents[1] / "assets" / "shapes"
    assert main(["data", "build", "--tiny", "--input", str(shapes), "--output", str(out), "--no-progress"]) == 0
    return out / "selected.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("train_*.yaml")))
def test_every_shipped_config_trains_with_tiny(tmp_path, shapes_manifest, name):
    arch = "sd15" if "sd15" in name else "sdxl"
    code = main([
        "train", "--tiny", arch, "--config", str(CONFIGS / name), "--set", "data.format=manifest",
        "--set", f"data.root={shapes_manifest}", "--set", "data.resolution=64", "--set", "data.num_workers=0",
        "--set", "optim.batch_size=2", "--set", "optim.max_steps=1", "--set", f"run.output_dir={tmp_path / 'run'}",
        "--set", "run.progress_bar=false",
    ])  # fmt: skip
    assert code == 0
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["models"]["base_model"]["tiny"] == arch and (tmp_path / "run" / "export").is_dir()


def test_real_model_folders_are_recorded_and_another_copy_is_refused(tmp_path, data, capsys):
    """Without --tiny: the models load from folders (no diffusers torch_dtype warning), the record holds
    their fingerprints and the adapter file's SHA-256, and a resume from an edited copy is refused."""
    import shutil
    import warnings

    from mipadapter.provenance import file_sha256, folder_fingerprint
    from mipadapter.testing import TINY_SDXL, tiny_checkpoint_files, tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "base")
    TINY_SDXL.basic_image_encoder.build()[0].save_pretrained(tmp_path / "encoder")
    adapter = tiny_checkpoint_files(tmp_path / "ckpt", pipe, dtype=None).basic_bin
    config = write_config(tmp_path, data)
    text = json.loads(config.read_text())
    text["model"] = {"base_model": str(tmp_path / "base"), "image_encoder": str(tmp_path / "encoder"),
                     "adapter_init": str(adapter)}  # fmt: skip
    config.write_text(json.dumps(text))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--config", str(config), "--stop-after", "1"]) == 0
    assert not [w for w in caught if "torch_dtype" in str(w.message) or "kept in float32" in str(w.message)]
    models = json.loads((tmp_path / "run" / "config.json").read_text())["models"]
    assert models["base_model"] == {"source": str(tmp_path / "base"), "fingerprint": folder_fingerprint(tmp_path / "base")}
    assert models["adapter_init"] == {"source": str(adapter), "sha256": file_sha256(adapter)}
    before = tree(tmp_path / "run")

    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    scheduler = tmp_path / "copy" / "scheduler" / "scheduler_config.json"
    scheduler.write_text(scheduler.read_text().replace("{", '{"comment": "edited",', 1))
    text["model"]["base_model"] = str(tmp_path / "copy")
    config.write_text(json.dumps(text))
    capsys.readouterr()
    code = main(["train", "--config", str(config)])
    old, new = folder_fingerprint(tmp_path / "base")[:12], folder_fingerprint(tmp_path / "copy")[:12]
    one_line(
        capsys, code,
        f"run folder '{tmp_path / 'run'}' was made with base model {tmp_path / 'base'} (fingerprint {old}…), "
        f"this call gives {tmp_path / 'copy'} (fingerprint {new}…)",
    )  # fmt: skip
    assert tree(tmp_path / "run") == before
