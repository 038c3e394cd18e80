"""The benchmark runners end to end on tiny models: files, results schema, resume without regeneration."""

from __future__ import annotations

import filecmp
import json
import shutil

import pytest
from eval_fakes import (
    ASSETS,
    REAL_DATA_ENV,
    CountingPipeline,
    FakePipeline,
    make_concept101,
    make_dreambench,
    make_scene_pet,
    real_data,
)
from PIL import Image

from mipadapter.eval.report import load_results, markdown_report
from mipadapter.eval.runner import run_concept101, run_dreambench
from mipadapter.eval.schema import IMAGE_FIELDS, SCHEMA, validate_results
from mipadapter.eval.variants import AUTHORS_NEGATIVE_PROMPT, GenerationSettings

FAST = GenerationSettings(num_inference_steps=1)


@pytest.fixture(scope="module")
def mip_pipe():
    from mipadapter.testing.mip import tiny_mip_pipeline

    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


def _concept101(tmp_path):
    root = make_concept101(tmp_path / "c101")
    for name in ("things_things.txt", "pet_pet.txt"):  # one prompt per combination keeps the test short
        path = root / "prompts" / name
        path.write_text(path.read_text().splitlines()[0] + "\n")
    return root


def test_concept101_runner_end_to_end_and_resume(tmp_path, mip_pipe, tiny_encoders):
    root, out = _concept101(tmp_path), tmp_path / "run"
    interrupted = CountingPipeline(mip_pipe, interrupt_at=3)
    kwargs = dict(
        pipelines={"mip": lambda: interrupted},
        encoders=tiny_encoders,
        variants="official",
        seeds=(420, 421),
        images_per_prompt=1,
        settings=FAST,
        models={"mip": {"adapter": "tiny"}},
        reference_boxes=root / "json_data",
    )
    with pytest.raises(KeyboardInterrupt):
        run_concept101(root, out, **kwargs)
    assert interrupted.calls == 3
    assert sorted(p.name for p in (out / "images" / "official").iterdir()) == [
        "00000_s420_0.png",
        "00000_s421_0.png",
        "00001_s420_0.png",
    ]  # no half-written files either
    assert not (out / "results.json").exists()

    resumed = CountingPipeline(mip_pipe)
    kwargs["pipelines"] = {"mip": lambda: resumed}
    results = run_concept101(root, out, **kwargs)
    assert resumed.calls == 1  # only the missing image
    assert resumed.kwargs[0]["prompt"] == "A photo of the cat and sofa."
    assert resumed.kwargs[0]["generator"][0].initial_seed() == 421
    assert resumed.kwargs[0]["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert resumed.kwargs[0]["require_names_in_prompt"] is False
    assert all(im.size == (224, 224) for s in resumed.kwargs[0]["subjects"] for im in s.images)  # cropped

    on_disk = load_results(out)
    validate_results(on_disk)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["schema"] == SCHEMA and on_disk["benchmark"] == "concept101"
    assert on_disk["clip_t_convention"] == "concept101" and on_disk["models"]["clip"] == "tiny-clip (random)"
    assert on_disk["settings"]["seeds"] == [420, 421] and on_disk["settings"]["num_inference_steps"] == 1
    assert on_disk["settings"]["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT
    assert (
        on_disk["settings"]["references"] == "crop" and "json_data" in on_disk["settings"]["reference_boxes"]
    )
    meta = json.loads((out / "meta" / "official" / "00000_s420_0.json").read_text())
    assert meta["settings"]["negative_prompt"] == AUTHORS_NEGATIVE_PROMPT  # what the pipeline actually used
    assert meta["warnings"] == [] and meta["settings"]["num_inference_steps"] == 1
    assert on_disk["dataset"]["quirks"] == [
        {"group": "c101/001", "quirk": "class 'sofa' does not match folder './benchmark_dataset/pet_dog1'"}
    ]
    images = on_disk["images"]
    assert len(images) == 4 and all(set(IMAGE_FIELDS) <= set(r) for r in images)
    for record in images:
        assert record["clip_t"] == pytest.approx(2.5 * max(record["clip_t_cos"], 0.0))
        assert set(record["clip_i"]) == set(record["subjects"])
        assert (out / record["file"]).exists()
    official = on_disk["variants"]["official"]
    assert official["aggregate"]["n_images"] == 4 and official["aggregate"]["clip_i"]["std"] is not None
    assert official["aggregate_without_quirks"]["n_images"] == 2  # the flagged combination left out
    prompts = json.loads((out / "prompts.json").read_text())
    assert [p["prompt"] for p in prompts] == [
        "photo of the backpack and teapot.",
        "A photo of the cat and sofa.",
    ]
    table = (out / "table.md").read_text()
    assert "CLIP-T = 2.5 * max(cos(CLIP image, CLIP prompt), 0)" in table and "without flagged cases" in table

    again = CountingPipeline(mip_pipe)
    kwargs["pipelines"] = {"mip": lambda: again}
    run_concept101(root, out, **kwargs)
    assert again.calls == 0


def test_a_run_folder_refuses_other_settings(tmp_path, tiny_encoders):
    root, out = _concept101(tmp_path), tmp_path / "run"
    kwargs = dict(
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=FAST,
        score=False,
        reference_boxes=root / "json_data",
    )
    assert run_concept101(root, out, **kwargs) is None
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings \(seeds: \[420\] → \[1\]\)"):
        run_concept101(root, out, seeds=(1,), **kwargs)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing lost


def test_a_run_folder_without_images_starts_again_with_new_settings(tmp_path, tiny_encoders):
    """A run stopped before its first image (e.g. a model failed to load) may be rerun with other
    settings; its record is then the new one. Guards both a refusal and a stale run.json."""
    root, out = _concept101(tmp_path), tmp_path / "run"
    kwargs = dict(encoders=tiny_encoders, settings=FAST, score=False, reference_boxes=root / "json_data")

    def failing():
        raise OSError("could not load the model")

    with pytest.raises(OSError, match="could not load"):
        run_concept101(root, out, pipelines={"mip": failing}, **kwargs)
    assert json.loads((out / "run.json").read_text())["seeds"] == [420]
    assert run_concept101(root, out, pipelines={"mip": FakePipeline}, seeds=(1,), **kwargs) is None
    assert json.loads((out / "run.json").read_text())["seeds"] == [1]
    assert sorted(p.name for p in (out / "images").rglob("*.png"))[0].endswith("_s1_0.png")


def test_dreambench_multi_runner_with_figures(tmp_path, mip_pipe, tiny_encoders):
    root = make_dreambench(tmp_path / "db")
    counting = CountingPipeline(mip_pipe)
    results = run_dreambench(
        root,
        tmp_path / "run",
        mode="multi",
        pairs=[("backpack", "dog")],
        pipelines={"mip": lambda: counting},
        encoders=tiny_encoders,
        settings=FAST,
        figures=True,
    )
    assert counting.calls == 2
    assert results["benchmark"] == "dreambench-multi" and results["clip_t_convention"] == "raw"
    assert results["dataset"]["missing_subjects"] == ["clock"]
    for record in results["images"]:
        assert record["clip_t"] == record["clip_t_cos"] and record["subjects"] == ["backpack", "dog"]
    figure = Image.open(tmp_path / "run" / "figures" / "official" / "00000_s420_0.png")
    sheet = Image.open(tmp_path / "run" / "sheets" / "official" / "00000_s420_0.png")
    assert figure.height > 2 * 192 and sheet.width >= 4 * 160  # 2 subject rows; refs + result + map


def test_dreambench_single_runner_with_a_fake_pipeline(tmp_path, tiny_encoders):
    root = make_dreambench(tmp_path / "db")
    fake = FakePipeline()
    results = run_dreambench(
        root,
        tmp_path / "run",
        mode="single",
        subjects=["teapot", "cat"],
        pipelines={"mip": lambda: fake},
        encoders=tiny_encoders,
        images_per_prompt=3,
        settings=FAST,
    )
    assert len(fake.calls) == 4 and all(call["num_images_per_prompt"] == 3 for call in fake.calls)
    assert [len(call["subjects"]) for call in fake.calls] == [1, 1, 1, 1]
    assert len(results["images"]) == 12
    assert results["variants"]["official"]["aggregate"]["by_subject"]["dino"].keys() == {"teapot", "cat"}


def test_report_never_mixes_clip_t_conventions(tmp_path, tiny_encoders):
    c101 = run_concept101(
        _concept101(tmp_path),
        tmp_path / "a",
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=FAST,
        variants="rules",
        reference_boxes=tmp_path / "c101" / "json_data",
    )
    db = run_dreambench(
        make_dreambench(tmp_path / "db"),
        tmp_path / "b",
        mode="multi",
        pairs=[("cat", "dog")],
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=FAST,
    )
    text = markdown_report([c101, db], ["c101", "db"])
    first, second = text.split("### ")[1:]
    assert first.startswith("concept101 — CLIP-T = 2.5") and "| db |" not in first
    assert second.startswith("dreambench-multi — CLIP-T = cos(") and "| c101 |" not in second
    assert first.count("| c101 | uniform |") == 1 and "| c101 | paper |" in first
    mean = c101["variants"]["official"]["aggregate"]["clip_i"]["mean"]
    assert f"{mean:.4f}" in first


def _scene_pet_run(root, out, **kwargs):
    return run_concept101(
        root,
        out,
        pipelines={"mip": FakePipeline},
        encoders=kwargs.pop("encoders"),
        settings=FAST,
        reference_boxes=root / "json_data",
        **kwargs,
    )


def test_prompts_that_never_name_a_subject_are_generated_and_flagged(tmp_path, tiny_encoders):
    """Concept101's scene+pet structure (combinations 82-88): one template names the scene twice and
    the pet never. All 24 prompts are generated; the unnamed ones are flagged, not fatal."""
    root = make_scene_pet(tmp_path / "c101")
    results = _scene_pet_run(root, tmp_path / "run", encoders=tiny_encoders)
    assert len(results["images"]) == 24
    unnamed = results["dataset"]["not_named"]
    assert [(u["case"], u["subjects"]) for u in unnamed] == [(4, ["dog"]), (16, ["cat"])]
    assert unnamed[0]["prompt"] == "A view of barn at noon with barn glowing warmly."
    flagged = [r["case"] for r in results["images"] if r["not_named"]]
    assert flagged == [4, 16] and all(r["warnings"] == [] for r in results["images"] if not r["not_named"])
    table = (tmp_path / "run" / "table.md").read_text()
    assert "2 of 24 prompts do not name a subject (subject not named in the prompt" in table


@pytest.mark.skipif(
    real_data("customconcept101") is None, reason=f"set {REAL_DATA_ENV} to a folder with customconcept101/"
)
def test_real_concept101_combinations_82_and_83_run_whole(tmp_path, tiny_encoders):
    """The real dataset_multiconcept.json and templates (photos stand in: the benchmark's are not here)."""
    real = real_data("customconcept101")
    root = tmp_path / "c101"
    shutil.copytree(real / "prompts", root / "prompts")
    shutil.copy(real / "dataset_multiconcept.json", root)
    entries = json.loads((root / "dataset_multiconcept.json").read_text())
    stand_ins = {"scene_barn": "backpack", "pet_dog1": "dog", "scene_lighthouse": "teapot", "pet_cat1": "cat"}
    for number in (82, 83):
        for concept in entries[number][:2]:
            folder = concept["instance_data_dir"].split("/")[-1]
            shutil.copytree(ASSETS / stand_ins[folder], root / "benchmark_dataset" / folder)
    from eval_fakes import write_box_files

    write_box_files(root)
    results = _scene_pet_run(root, tmp_path / "run", encoders=tiny_encoders, combinations=[82, 83])
    assert len(results["images"]) == 24 and results["dataset"]["cases"] == 24
    unnamed = results["dataset"]["not_named"]
    assert [u["subjects"] for u in unnamed] == [["dog"], ["cat"]]
    assert unnamed[0]["prompt"] == "A photo of barn at dawn with barn sleeping peacefully."


def _same_files(a, b, skip=()):
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert names_a == names_b
    for name in names_a:
        if str(name) not in skip:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


def test_two_ranks_split_the_work_and_write_what_one_process_writes(tmp_path, tiny_encoders):
    root = make_scene_pet(tmp_path / "c101")
    one = _scene_pet_run(root, tmp_path / "one", encoders=tiny_encoders, seeds=(420, 421))
    fakes = [FakePipeline(), FakePipeline()]
    for rank in (1, 0):  # rank 1 first: in a real run rank 0 scores only after the barrier
        run_concept101(
            root,
            tmp_path / "two",
            pipelines={"mip": lambda rank=rank: fakes[rank]},
            encoders=tiny_encoders,
            settings=FAST,
            seeds=(420, 421),
            reference_boxes=root / "json_data",
            rank=rank,
            world_size=2,
        )
    assert [len(f.calls) for f in fakes] == [24, 24]  # 48 (case, seed) pairs, disjoint halves
    seen = [(c["prompt"], c["generator"][0].initial_seed()) for f in fakes for c in f.calls]
    assert len(set(seen)) == 48
    _same_files(tmp_path / "one", tmp_path / "two", skip=("table.md",))  # its rows name the run folder
    table = (tmp_path / "two" / "table.md").read_text().replace("two", "one")
    assert table == (tmp_path / "one" / "table.md").read_text()
    assert one == json.loads((tmp_path / "two" / "results.json").read_text())


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_write_what_one_process_writes(tmp_path):
    """The real path: `accelerate launch -m mipadapter.eval concept101 --tiny` on 2 CPU processes."""
    import os
    import subprocess
    import sys

    root = make_scene_pet(tmp_path / "c101")
    for path in (root / "prompts").glob("*.txt"):  # 4 templates (the unnamed one among them) keep it short
        path.write_text("\n".join(path.read_text().splitlines()[3:7]) + "\n")
    common = [
        "concept101", "--benchmark-dir", str(root), "--reference-boxes", str(root / "json_data"),
        "--tiny", "--steps", "1", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "mipadapter.eval", *common, "--out", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29531",
        "-m", "mipadapter.eval", *common, "--out", str(tmp_path / "two"),
    ]  # fmt: skip
    double = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    _same_files(tmp_path / "one", tmp_path / "two", skip=("table.md",))
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(results["images"]) == 8 and len(results["dataset"]["not_named"]) == 2
