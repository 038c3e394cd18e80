"""The Gradio page without a server: its wiring (one generation at a time), its examples, the CLI."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from mipadapter.cli.main import build_parser, main
from mipadapter.recipe import ModelRecord
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
    assert (args.host, args.port, args.tiny, args.max_subjects) == ("127.0.0.1", 7860, "sdxl", 4)
    assert build_parser().parse_args(["web", "--tiny", "sd15"]).tiny == "sd15"
    args = build_parser().parse_args(["web", "--host", "0.0.0.0", "--port", "9000", "--preset", "ip-sdxl"])
    assert (args.host, args.port, args.preset, args.tiny) == ("0.0.0.0", 9000, "ip-sdxl", None)


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


def component(app, elem_id: str):
    (found,) = [block for block in app.blocks.values() if getattr(block, "elem_id", None) == elem_id]
    return found


def test_advanced_shows_the_loaded_presets_negative_prompt_and_scale(web, pipe, monkeypatch):
    monkeypatch.setattr(pipe, "default_negative_prompt", "monochrome, lowres", raising=False)
    app = web.build_app(pipe)
    assert component(app, "negative-prompt").value == "monochrome, lowres"
    assert component(app, "default-strength").value == pipe.adapter.config.default_scale
    assert component(app, "subject-0-strength").value == pipe.adapter.config.default_scale
    assert component(app, "region-mode").value == "replace"
    assert component(app, "guidance").value == 5.0  # SDXL's default, shown (an empty field would read as 0)


def test_the_model_line_names_the_family_and_the_models(web, pipe):
    record = ModelRecord("tiny-sdxl (random)", "tiny-mip (random)", "tiny", tiny="sdxl")
    line = web.model_line(pipe, record, compiled=True)
    assert line.startswith("Model: **SDXL** (compiled)")
    assert "base model `tiny-sdxl (random)`" in line and "preset" not in line


def test_cli_compile_compiles_the_unet_and_turns_routing_maps_off(web, monkeypatch):
    built = {}

    def build_app(pipe, *args, **kwargs):
        built.update(pipe=pipe, models=args[1], compiled=kwargs["compiled"])
        return "app"

    monkeypatch.setattr(web, "build_app", build_app)
    monkeypatch.setattr(web, "launch", lambda app, **kwargs: built.update(launched=app))
    assert main(["web", "--tiny", "--compile"]) == 0
    assert built["launched"] == "app" and built["compiled"] is True
    assert built["pipe"].pipe.unet.forward is not type(built["pipe"].pipe.unet).forward  # torch.compile'd
    assert isinstance(built["models"], ModelRecord) and built["models"].tiny == "sdxl"  # what recipes record


def test_page_history_numbers_runs_per_page_newest_first_and_stays_bounded(web, tmp_path):
    a1, a2, a3, a4, b1, b2, c1 = (SimpleNamespace(image=name) for name in "a1 a2 a3 a4 b1 b2 c1".split())
    history = web.PageHistory(max_images=3, max_pages=2)
    assert history.add("a", [a1], "seed 1") == [(a1, "#1 · seed 1")]
    assert history.add("b", [b1, b2], "seed 9") == [(b1, "#1 · seed 9"), (b2, "#1 · seed 9")]
    assert history.add("a", [], "") == [(a1, "#1 · seed 1")]  # a run that made nothing is not counted
    shown = history.add("a", [a2, a3], "seed 2")
    assert shown == [(a2, "#2 · seed 2"), (a3, "#2 · seed 2"), (a1, "#1 · seed 1")]
    assert history.add("a", [a4], "seed 3")[0] == (a4, "#3 · seed 3") and len(history.add("a", [], "")) == 3
    history.add("c", [c1], "seed 5")  # a third page: the least recently used ("b") is dropped
    assert history.add("b", [], "") == []
    assert history.add("c", [], "") == [(c1, "#1 · seed 5")]
    written = tmp_path / "c2.png"  # a written PNG, deleted when results expire: it leaves the history
    written.write_bytes(b"png")
    assert history.add("c", [written], "seed 6") == [(written, "#2 · seed 6"), (c1, "#1 · seed 5")]
    written.unlink()
    assert history.add("c", [], "") == [(c1, "#1 · seed 5")]
    history.drop("c")  # the page was closed
    assert history.add("c", [], "") == []


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


def test_flux_gets_a_true_cfg_field_and_no_official_rule(web, pipe):
    """On FLUX the negative prompt acts only with true CFG: the page says so beside a true-CFG field, and
    the rule list leaves out official (no FLUX adapter has its text weight); SDXL's page is unchanged."""
    flux = web.build_app(tiny_mip_pipeline("flux"))
    rule = component(flux, "rule")
    assert [choice[1] for choice in rule.choices] == ["uniform", "paper"] and rule.value == "paper"
    assert component(flux, "true-cfg").value == 1.0
    assert "used only with a true CFG above 1" in component(flux, "negative-prompt").label
    sdxl = web.build_app(pipe)
    assert [choice[1] for choice in component(sdxl, "rule").choices] == ["uniform", "paper", "official"]
    assert not [b for b in sdxl.blocks.values() if getattr(b, "elem_id", None) == "true-cfg"]


def test_messages_show_as_written_not_as_markdown(web):
    assert web.plain("0..2**64-1") == "0\\.\\.2\\*\\*64\\-1"  # a browser test shows it rendered
    assert web.plain("subject '_cat_' <b>") == "subject '\\_cat\\_' \\<b\\>"
    assert web.plain("plain words") == "plain words"


def test_number_fields_pass_what_was_typed_to_the_handler(web, pipe):
    app = web.build_app(pipe)
    width, seed = component(app, "width"), component(app, "seed")
    assert width.preprocess(5000) == 5000  # Gradio's own check would answer with an error, not our message
    assert seed.preprocess(-5.0) == -5 and seed.preprocess(1e20) == 10**20


def test_the_queue_note_needs_no_emoji_font(web):
    """Every character the queue note writes is in DejaVu Sans (⏳, U+23F3, is only in emoji fonts)."""
    for script in (web.QUEUE_CLICK_JS, web.QUEUE_DONE_JS):
        assert all(ord(character) < 0x2300 for character in script), script


def test_a_subject_gets_an_adapter_choice_only_when_the_pipeline_holds_several(web, pipe):
    from mipadapter.testing.mip import ARCHS, tiny_adapter

    single = web.build_app(pipe)
    ids = [getattr(block, "elem_id", None) or "" for block in single.blocks.values()]
    assert not any(elem_id.endswith("-adapter") for elem_id in ids)  # one adapter: the page as it was
    mixed = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
    mixed.add_adapter("face", tiny_adapter(mixed.pipe.unet, ARCHS["sdxl"][0].basic_image_encoder, "basic", True, 7))
    app = web.build_app(mixed)
    for slot in range(4):  # every slot, the default preselected
        choice = component(app, f"subject-{slot}-adapter")
        assert [value for _, value in choice.choices] == ["default", "face"]
        assert choice.value == "default"
    by_name = {fn.name: fn for fn in app.fns.values()}
    inputs = {getattr(block, "elem_id", None) for block in by_name["on_generate"].inputs}
    assert {f"subject-{slot}-adapter" for slot in range(4)} <= inputs  # what the handler is given
