"""``--authors-scoring``: the authors' Concept101 evaluation with its two quirks (issue 17, item 7).

Their images are saved as ``{prompt}_gen.png`` per combination, so a repeated prompt overwrites the first
image, and CLIP-T reads the prompt back as ``file.split('.')[0] + '.'``; they average per combination,
then over combinations. Our default scores every image against its own prompt, all images equal."""

from __future__ import annotations

import numpy as np
import pytest
from eval_fakes import FakePipeline, make_concept101

from mipadapter.cli.main import main
from mipadapter.eval.runner import run_concept101, run_dreambench
from mipadapter.eval.scoring import authors_clip_t_text
from mipadapter.eval.variants import GenerationSettings


@pytest.mark.parametrize(
    ("prompt", "scored"),
    [
        ("A photo of the cat and dog.", "A photo of the cat and dog."),
        ("A small cat inside the wooden pot", "A small cat inside the wooden pot_gen."),  # no final period
        ("Mr. cat sits on a mat.", "Mr."),  # an inner period cuts the text there
    ],
)
def test_the_authors_read_the_prompt_back_from_the_file_name(prompt, scored):
    assert authors_clip_t_text(prompt) == scored


@pytest.fixture
def benchmark(tmp_path):
    """Combination 0 with a repeated prompt and one without a final period (3 images survive their
    naming out of 4); combination 1 with 2 prompts: unequal groups, so per-group weighting shows."""
    root = make_concept101(tmp_path / "c101")
    (root / "prompts" / "things_things.txt").write_text(
        "photo of the {0} and {1}.\nphoto of the {0} and {1}.\n{1} and {0} on a table\nthe {0} near a {1}.\n"
    )
    return root


def _cosine(encoders, image_features, text):
    text_features = encoders.clip.text_features([text]).cpu().numpy()[0]
    return float(image_features @ text_features / np.linalg.norm(image_features) / np.linalg.norm(text_features))


def test_authors_scoring_drops_overwritten_repeats_scores_their_text_and_weights_groups(
    tmp_path, benchmark, tiny_encoders
):
    kwargs = dict(
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=GenerationSettings(num_inference_steps=1),
        reference_boxes=benchmark / "json_data",
    )
    ours = run_concept101(benchmark, tmp_path / "run", **kwargs)
    authors = run_concept101(benchmark, tmp_path / "run", authors_scoring=True, **kwargs)  # same images
    assert ours["scoring"] == "ours" and authors["scoring"] == "authors"

    mine = {r["case"]: r for r in ours["images"]}
    theirs = {r["case"]: r for r in authors["images"]}
    assert all(r["clip_t_text"] == r["prompt"] for r in mine.values())
    assert [theirs[i]["authors_kept"] for i in range(6)] == [False, True, True, True, True, True]
    assert theirs[2]["clip_t_text"] == "teapot and backpack on a table_gen."
    assert theirs[0]["clip_t_text"] == theirs[0]["prompt"] == "photo of the backpack and teapot."

    flat = tiny_encoders.clip.image_features([FakePipeline()("x", []).images[0]]).cpu().numpy()[0]
    assert theirs[2]["clip_t_cos"] == pytest.approx(_cosine(tiny_encoders, flat, theirs[2]["clip_t_text"]), abs=1e-6)
    assert mine[2]["clip_t_cos"] == pytest.approx(_cosine(tiny_encoders, flat, mine[2]["prompt"]), abs=1e-6)
    assert theirs[2]["clip_t_cos"] != pytest.approx(mine[2]["clip_t_cos"], abs=1e-6)

    kept = [r for r in theirs.values() if r["authors_kept"]]
    groups = {}
    for record in kept:
        groups.setdefault(record["group"], []).append(record["clip_t"])
    by_group = np.mean([np.mean(values) for values in groups.values()])
    official = authors["variants"]["official"]["aggregate"]
    assert official["clip_t"]["mean"] == pytest.approx(by_group, abs=1e-9)
    assert ours["variants"]["official"]["aggregate"]["clip_t"]["mean"] == pytest.approx(
        np.mean([r["clip_t"] for r in mine.values()]), abs=1e-9
    )

    assert main(["eval", "report", str(tmp_path / "run")]) == 0  # the last scoring: the authors'


def test_by_group_weights_each_group_equally_per_seed():
    from mipadapter.eval.aggregate import aggregate

    def record(group, seed, clip_t, clip_i):
        return {"group": group, "seed": seed, "subjects": ["a"], "clip_t": clip_t, "clip_i": {"a": clip_i}, "dino": {"a": 0.5}}

    records = [
        record("g0", 1, 0.2, 0.1), record("g0", 1, 0.4, 0.3), record("g0", 1, 0.6, 0.5), record("g1", 1, 1.0, 0.9),
        record("g0", 2, 0.0, 0.2), record("g1", 2, 0.8, 0.4), record("g1", 2, 0.6, 0.6),
    ]  # fmt: skip
    grouped, flat = aggregate(records, by_group=True), aggregate(records)
    assert grouped["clip_t"]["per_seed"] == pytest.approx({"1": (0.4 + 1.0) / 2, "2": (0.0 + 0.7) / 2})
    assert flat["clip_t"]["per_seed"] == pytest.approx({"1": 2.2 / 4, "2": 1.4 / 3})
    assert grouped["clip_i"]["per_seed"] == pytest.approx({"1": (0.3 + 0.9) / 2, "2": (0.2 + 0.5) / 2})
    assert grouped["clip_t"]["mean"] == pytest.approx((0.7 + 0.35) / 2) and grouped["n_images"] == 7


def test_the_report_labels_the_authors_scoring(tmp_path, benchmark, tiny_encoders, capsys):
    run_concept101(
        benchmark,
        tmp_path / "run",
        pipelines={"mip": FakePipeline},
        encoders=tiny_encoders,
        settings=GenerationSettings(num_inference_steps=1),
        reference_boxes=benchmark / "json_data",
        authors_scoring=True,
    )
    assert main(["eval", "report", str(tmp_path / "run")]) == 0
    assert "| run (authors' scoring) | official | 5 |" in capsys.readouterr().out


def test_authors_scoring_is_concept101_only(tmp_path):
    with pytest.raises(ValueError, match="DreamBench has none"):
        run_dreambench(tmp_path, tmp_path / "out", pipelines={}, encoders=None, authors_scoring=True)


def test_the_flag_reaches_the_library(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("mipadapter.eval.api.evaluate_concept101", lambda *a, **k: seen.update(k))
    (tmp_path / "b").mkdir()
    base = ["eval", "concept101", "--benchmark-dir", str(tmp_path / "b"), "--out", str(tmp_path / "o"), "--tiny"]
    assert main(base) == 0 and seen["authors_scoring"] is False
    assert main([*base, "--authors-scoring"]) == 0 and seen["authors_scoring"] is True
