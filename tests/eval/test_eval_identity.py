"""An eval run folder knows its models: ``--tiny`` honours the adapter flags, and a resume with other
models is refused before anything loads (issue 17, items 1 and 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_fakes import make_concept101
from PIL import Image

from mipadapter.cli.main import main
from mipadapter.provenance import RunMismatchError, check_same_models, file_sha256, source_identity


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two adapter files for the tiny SDXL (different seeds) and one for the tiny SD1.5."""
    from mipadapter import save_adapter
    from mipadapter.testing.mip import tiny_mip_pipeline

    folder = tmp_path_factory.mktemp("adapters")
    return {
        "a": save_adapter(tiny_mip_pipeline("sdxl", seed=5).adapter, folder / "a.safetensors"),
        "b": save_adapter(tiny_mip_pipeline("sdxl", seed=6).adapter, folder / "b.safetensors"),
        "sd15": save_adapter(tiny_mip_pipeline("sd15").adapter, folder / "sd15.safetensors"),
    }


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory):
    root = make_concept101(tmp_path_factory.mktemp("c101") / "c101")
    for path in (root / "prompts").glob("*.txt"):  # one prompt per combination keeps it short
        path.write_text(path.read_text().splitlines()[0] + "\n")
    return root


def _eval(root, out, *extra):
    return main([
        "eval", "concept101", "--benchmark-dir", str(root), "--reference-boxes", str(root / "json_data"),
        "--out", str(out), "--tiny", "--steps", "1", "--device", "cpu", "--no-score", *extra,
    ])  # fmt: skip


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))}


def _one_line(capsys, code, expected):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err


def test_tiny_eval_uses_the_adapter_file_and_records_it(tmp_path, benchmark, adapters):
    assert _eval(benchmark, tmp_path / "a", "--adapter", str(adapters["a"])) == 0
    assert _eval(benchmark, tmp_path / "b", "--adapter", str(adapters["b"])) == 0
    assert _eval(benchmark, tmp_path / "builtin") == 0
    a, b, builtin = (_pixels(tmp_path / name) for name in ("a", "b", "builtin"))
    assert a.keys() == b.keys() == builtin.keys() and len(a) == 2
    for name in a:  # every image differs between the two adapters and from the built-in one
        assert not np.array_equal(a[name], b[name]) and not np.array_equal(a[name], builtin[name])
    models = json.loads((tmp_path / "a" / "run.json").read_text())["models"]
    assert models["mip.adapter"] == {
        "source": str(adapters["a"].resolve()),
        "sha256": file_sha256(adapters["a"]),
    }
    assert models["mip.base_model"]["tiny"] == "sdxl" and len(models["mip.base_model"]["tokenizer"]) == 16


def test_resuming_with_another_adapter_is_refused_and_changes_nothing(tmp_path, benchmark, adapters, capsys):
    out = tmp_path / "run"
    assert _eval(benchmark, out, "--adapter", str(adapters["a"])) == 0
    victim = sorted(out.rglob("*.png"))[0]
    victim.unlink()  # a gap the second call would fill
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = _eval(benchmark, out, "--adapter", str(adapters["b"]))
    sha_a, sha_b = file_sha256(adapters["a"])[:12], file_sha256(adapters["b"])[:12]
    _one_line(
        capsys,
        code,
        f"run folder {str(out)!r} was made with mip adapter {adapters['a'].resolve()} (sha256 {sha_a}…), "
        f"this call gives {adapters['b'].resolve()} (sha256 {sha_b}…)",
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before and not victim.exists()
    _one_line(capsys, _eval(benchmark, out), "this call gives tiny mip adapter")  # the built-in one
    assert _eval(benchmark, out, "--adapter", str(adapters["a"])) == 0 and victim.exists()  # same: resumes


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--adapter", "/nonexistent/zzz.bin"], "adapter '/nonexistent/zzz.bin' does not exist"),
        (["--base-model", "some/base"], "--base-model cannot be used with --tiny"),
        (["--image-encoder", "some/encoder"], "--image-encoder cannot be used with --tiny"),
        (["--adapter", "SD15"], "this adapter belongs to another base model"),
    ],
)
def test_tiny_eval_refuses_what_it_cannot_use_before_writing(tmp_path, benchmark, adapters, capsys, flags, expected):
    flags = [str(adapters["sd15"]) if flag == "SD15" else flag for flag in flags]
    _one_line(capsys, _eval(benchmark, tmp_path / "run", *flags), expected)
    assert not (tmp_path / "run").exists()


def test_identities_name_files_folders_and_hub_commits(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "weights.bin").write_bytes(b"\0" * 10)
    folder = source_identity(model, model)
    assert folder == {"source": str(model.resolve()), "fingerprint": folder["fingerprint"]}
    (model / "model_index.json").write_text('{"other": 1}')  # another config: another model
    assert source_identity(model, model)["fingerprint"] != folder["fingerprint"]
    snapshot = tmp_path / "hub" / "models--o--r" / "snapshots" / "0123abcd" / "sub"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    hub = source_identity("o/r/sub", snapshot, folder_marker=snapshot / "config.json")
    assert hub == {"source": "o/r/sub", "revision": "0123abcd"}
    check_same_models(tmp_path, {"x.adapter": hub}, {"x.adapter": dict(hub)})
    with pytest.raises(RunMismatchError, match="made with x adapter o/r/sub@0123abcd, this call gives nothing"):
        check_same_models(tmp_path, {"x.adapter": hub}, {})
    with pytest.raises(RunMismatchError, match="records no models"):
        check_same_models(tmp_path, None, {"x.adapter": hub})


def test_tokenizer_identity_tells_vocabularies_apart_and_ignores_runtime_state():
    from mipadapter.provenance import tokenizer_identity
    from mipadapter.testing import build_clip_tokenizer, has_real_clip_vocab

    fallback = build_clip_tokenizer(vocab="fallback")
    first = tokenizer_identity(fallback)
    fallback("a cat " * 100, truncation=True, max_length=8, padding="max_length")  # run-time state only
    assert tokenizer_identity(fallback) == first == tokenizer_identity(build_clip_tokenizer(vocab="fallback"))
    assert tokenizer_identity(build_clip_tokenizer("!", vocab="fallback")) != first  # another pad token
    if has_real_clip_vocab():
        assert tokenizer_identity(build_clip_tokenizer(vocab="clip")) != first
