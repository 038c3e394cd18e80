"""The benchmark runners end to end on tiny models: files, results schema, resume without regeneration."""

from __future__ import annotations

import json

import pytest
from eval_fakes import CountingPipeline, FakePipeline, make_concept101, make_dreambench
from PIL import Image

from mipadapter.eval.report import load_results, markdown_report
from mipadapter.eval.runner import run_concept101, run_dreambench
from mipadapter.eval.schema import IMAGE_FIELDS, SCHEMA, validate_results
from mipadapter.eval.variants import GenerationSettings

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

    on_disk = load_results(out)
    validate_results(on_disk)
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["schema"] == SCHEMA and on_disk["benchmark"] == "concept101"
    assert on_disk["clip_t_convention"] == "concept101" and on_disk["models"]["clip"] == "tiny-clip (random)"
    assert on_disk["settings"]["seeds"] == [420, 421] and on_disk["settings"]["num_inference_steps"] == 1
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
    kwargs = dict(pipelines={"mip": FakePipeline}, encoders=tiny_encoders, settings=FAST, score=False)
    assert run_concept101(root, out, **kwargs) is None
    with pytest.raises(ValueError, match=r"other settings \(seeds: \[420\] → \[1\]\)"):
        run_concept101(root, out, seeds=(1,), **kwargs)


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
