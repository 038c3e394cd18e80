"""The Gradio page without a server: its wiring (one generation at a time), its examples, the CLI."""

from __future__ import annotations

import sys

import pytest

from mipadapter.cli.main import build_parser, main
from mipadapter.testing.mip import tiny_mip_pipeline
from mipadapter.web.handler import GenerateRequest, SubjectForm, generate, native_side


@pytest.fixture(scope="module")
def pipe():
    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


@pytest.fixture(scope="module")
def web(need):
    need("gradio")
    import mipadapter.web.app as web

    return web


def test_cli_binds_to_loopback_by_default():
    args = build_parser().parse_args(["web", "--tiny"])
    assert (args.host, args.port, args.tiny, args.max_subjects) == ("127.0.0.1", 7860, True, 4)
    args = build_parser().parse_args(["web", "--host", "0.0.0.0", "--port", "9000", "--preset", "ip-sdxl"])
    assert (args.host, args.port, args.preset, args.tiny) == ("0.0.0.0", 9000, "ip-sdxl", False)


def test_cli_without_gradio_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if not installed
    monkeypatch.delitem(sys.modules, "mipadapter.web.app", raising=False)
    assert main(["web", "--tiny"]) == 2
    assert "the web demo needs gradio: pip install 'mipadapter[web]'" in capsys.readouterr().err


def test_generation_runs_one_at_a_time_and_ui_helpers_stay_off_the_api(web, pipe):
    app = web.build_app(pipe)
    by_name = {fn.name: fn for fn in app.fns.values()}
    generate_fn = by_name["on_generate"]
    assert generate_fn.queue and generate_fn.concurrency_limit == 1
    assert generate_fn.api_name == "generate"
    assert all(fn.api_visibility == "private" for name, fn in by_name.items() if name != "on_generate")


def test_examples_ship_with_the_package_and_generate(web, pipe):
    side = native_side(pipe)
    for label, spec in web.examples(side).items():
        assert len(spec["subjects"]) == 2, label
        forms = [
            SubjectForm(name, [str(photo)], box=list(box) if box else None)
            for name, photo, box in spec["subjects"]
        ]
        for _, photo, _ in spec["subjects"]:
            assert photo.is_file() and photo.parent == web.EXAMPLES
        result = generate(pipe, GenerateRequest(spec["prompt"], forms, steps=1))
        assert result.ok, (label, result.status)
        assert len(result.maps) == 2
    assert (web.EXAMPLES / "README.md").read_text().count("CC BY 4.0") == 1
