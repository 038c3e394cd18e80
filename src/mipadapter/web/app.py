"""The Gradio page: widgets in, ``handler.generate`` called, images and routing maps out.

``build_app(pipe)`` lays the page out around a loaded ``MIPAdapterPipeline`` (models are loaded once, by
the caller); ``launch(app, host, port)`` serves it with one generation at a time: a click while one runs
waits in Gradio's queue (its position shown) and every result is kept in the page's history, in order.
Everything a person can get wrong is checked by the handler and shown next to the subject it concerns;
the canvas preview (``preview.region_preview``) draws each subject's region in its colour.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import MethodType

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check

import gradio as gr  # noqa: E402

from mipadapter.config import MultiImageMode, RegionMode  # noqa: E402
from mipadapter.limits import LimitError, check_images, check_scale, check_side, check_steps  # noqa: E402
from mipadapter.web.editor import region_editor  # noqa: E402
from mipadapter.web.guard import RequestGuard, is_loopback  # noqa: E402
from mipadapter.web.handler import (  # noqa: E402
    BOX_CLEARED,
    PAINT_CLEARED,
    GenerateRequest,
    Limits,
    SlotRegion,
    SubjectForm,
    adapter_choices,
    adapter_scale,
    check_upload_size,
    default_guidance,
    first_rule,
    generate,
    model_family,
    native_side,
    offered_rules,
    on_slider,
    page_number,
    paint_stretched,
    painted_mask,
    settle_region,
    slot_color,
    takes_true_cfg,
)
from mipadapter.web.preview import canvas_size, paint_canvas, preview_size, region_preview  # noqa: E402

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parent / "examples"
VISIBLE_AT_START = 2
HISTORY_IMAGES = 24
"""The page's history keeps this many of the latest images (older ones drop off)."""
HISTORY_PAGES = 64
"""Histories kept at once (one per open page); the least recently used is dropped beyond that."""
RESULTS_MAX_AGE_S = 3600
"""Written PNGs older than this are deleted (Gradio serves its own copies, which it also drops hourly)."""

CSS = """
.subject-error, .subject-error p { color: #b3261e !important; font-weight: 600; }
.subject-warning, .subject-warning p { color: #8a5300 !important; font-weight: 600; }
#status p { font-size: 1.05em; }
.subject-photos .delete-button { opacity: 1 !important; }  /* "remove this photo" visible, not on hover */
.subject-title h3 { margin: 0; }
#images .fixed-height, #maps .fixed-height, #history .fixed-height {
  min-height: 160px !important; max-height: none !important;
}
/* the editor's label stays clear of its toolbar (top right) at a phone's width */
.region-editor label[data-testid="block-label"] {
  max-width: 38%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap;
}
#history .caption-label { white-space: normal !important; overflow: visible !important; }
/* every result whole, at its own aspect ratio (a 96×32 image is not cut to its middle third) */
#images .thumbnail-item, #maps .thumbnail-item, #history .thumbnail-item {
  aspect-ratio: auto !important; height: auto !important;
}
#images .thumbnail-item img, #maps .thumbnail-item img, #history .thumbnail-item img {
  width: 100% !important; height: auto !important; object-fit: contain !important;
}
"""


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$&])")


def plain(text: str) -> str:
    """``text`` for a Markdown field, shown as written: every character Markdown (or HTML) would act on is
    escaped, so that ``0..2**64-1`` or a subject called ``_cat_`` shows as it is."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _unchecked_preprocess(component, payload):
    return page_number(payload)


def unchecked(component):
    """A number field or slider whose value reaches the handler as typed, out of range or not: Gradio's
    own check would answer a typed 5000 with an HTTP error (or a bare "Error"), while the handler refuses
    it with the CLI's message, before the model runs. Whole floats become ints (``page_number``)."""
    component.preprocess = MethodType(_unchecked_preprocess, component)
    return component


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def examples(side: int) -> dict[str, dict]:
    """The example buttons: label → prompt and two subjects (name, photo, box or None)."""
    half = side // 2
    return {
        "Example: cat + backpack": {
            "prompt": "a cat wearing a backpack on a sunny beach",
            "subjects": [("cat", EXAMPLES / "cat.jpg", None), ("backpack", EXAMPLES / "backpack.jpg", None)],
        },
        "Example: dog + teapot, with boxes": {
            "prompt": "a dog next to a teapot on a wooden table",
            "subjects": [
                ("dog", EXAMPLES / "dog.jpg", (0, 0, half, side)),
                ("teapot", EXAMPLES / "teapot.jpg", (half, 0, side, side)),
            ],
        },
    }


def gallery_paths(value) -> list:
    """A gallery's value (``(path, caption)`` pairs, or bare paths) → the paths."""
    return [item[0] if isinstance(item, (tuple, list)) else item for item in value or ()]


def model_line(pipe, models=None, compiled: bool = False) -> str:
    """The page's model line: the family (SDXL, SD1.5, FLUX …) and the loaded weights.

    models: a ``mipadapter.recipe.ModelRecord`` or a dict (name → id); compiled: the UNet is compiled."""
    shown = models.to_dict() if hasattr(models, "to_dict") else dict(models or {})
    parts = [f"Model: **{model_family(pipe)}**" + (" (compiled)" if compiled else "")]
    parts += [f"{key.replace('_', ' ')} `{value}`" for key, value in shown.items() if value is not None]
    return " · ".join(parts)


def results_folder() -> Path:
    """A private folder for the PNGs the page writes, removed when the server exits."""
    folder = Path(tempfile.mkdtemp(prefix="mipadapter-web-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def drop_old_results(folder: Path, max_age_s: float = RESULTS_MAX_AGE_S) -> None:
    """Delete the per-generation folders in ``folder`` older than ``max_age_s`` seconds."""
    cutoff = time.time() - max_age_s
    for run in folder.glob("run-*"):
        try:
            if run.stat().st_mtime < cutoff:
                shutil.rmtree(run, ignore_errors=True)
        except FileNotFoundError:
            pass


def _still_there(image) -> bool:
    """A PIL image, or a written file that still exists."""
    return not isinstance(image, (str, os.PathLike)) or Path(image).is_file()


class PageHistory:
    """Every page's results, numbered in the order the model produced them, which is the order of the
    clicks (Gradio's queue is first in, first out and runs one generation at a time).

    Kept on the server by Gradio session and appended by the generation itself: a page's queued clicks
    each carry the page's state as it was when clicked, so a history in page state would lose results.
    """

    def __init__(self, max_images: int = HISTORY_IMAGES, max_pages: int = HISTORY_PAGES) -> None:
        self.max_images, self.max_pages = max_images, max_pages
        self._lock = threading.Lock()
        # session → (runs so far, [(image, caption)] newest first)
        self._pages: OrderedDict[str, tuple[int, list]] = OrderedDict()

    def add(self, page: str, images: list, caption: str) -> list:
        """Record one run's images under ``caption`` (numbered ``#N · caption``); the page's gallery,
        newest first."""
        with self._lock:
            runs, shown = self._pages.pop(page, (0, []))
            shown = [item for item in shown if _still_there(item[0])]  # written files expire after an hour
            if images:
                runs += 1
                shown = [(image, f"#{runs} · {caption}") for image in images] + shown
            self._pages[page] = (runs, shown[: self.max_images])
            while len(self._pages) > self.max_pages:
                self._pages.popitem(last=False)
            return list(self._pages[page][1])

    def drop(self, page: str) -> None:
        with self._lock:
            self._pages.pop(page, None)


QUEUE_NOTE = "queue-note-text"
"""The element (inside the ``#queue-note`` HTML block) where the page says how many of its clicks wait."""

_SHOW_PENDING = (
    f"\n  const note = document.getElementById({QUEUE_NOTE!r});"
    + """
  const waiting = window.mipadapterPending - 1;
  if (note) note.textContent = waiting > 0
    ? `Queue: 1 generation running, ${waiting} waiting in the queue (yours run one at a time, in the order `
      + `you clicked; your last click is number ${window.mipadapterPending} in line).`
    : "";
"""
)
QUEUE_CLICK_JS = (
    "() => {\n  window.mipadapterPending = (window.mipadapterPending || 0) + 1;" + _SHOW_PENDING + "}"
)
"""Counts a click at once, in the browser: a server round trip would delay the queued generation."""
QUEUE_DONE_JS = (
    "(...values) => {\n  window.mipadapterPending = Math.max(0, (window.mipadapterPending || 0) - 1);"
    + _SHOW_PENDING
    + "  return values;\n}"
)
"""Counts a finished generation (success or not) and passes the event's values through unchanged."""


class _Slot:
    """The widgets of one subject slot."""

    def __init__(
        self, index: int, default_scale: float, visible: bool, side: int, adapters: list[str]
    ) -> None:
        """adapters: the pipeline's adapter names, the default first; with more than one, the slot has
        a choice among them."""
        self.color = slot_color(index)
        self.adapters = adapters
        color = _hex(self.color)
        with gr.Group(visible=visible) as self.group:
            gr.Markdown(f"<h3 style='color:{color}'>Subject {index + 1}</h3>", elem_classes=["subject-title"])
            with gr.Row():
                self.name = gr.Textbox(
                    label="Name (as written in the prompt)",
                    placeholder="e.g. cat",
                    elem_id=f"subject-{index}-name",
                    scale=2,
                )
                self.strength = unchecked(
                    gr.Slider(
                        0.0,
                        1.5,
                        value=default_scale,
                        step=0.05,
                        label="Strength",
                        elem_id=f"subject-{index}-strength",
                        scale=1,
                    )
                )
            self.adapter = (
                gr.Dropdown(
                    adapters,
                    value=adapters[0],
                    label="Adapter (the default, or one for faces …)",
                    elem_id=f"subject-{index}-adapter",
                )
                if len(adapters) > 1
                else None
            )
            self.photos = gr.Gallery(
                label="Photos (one or more; × removes one)",
                file_types=["image"],
                type="filepath",
                interactive=True,
                columns=4,
                fit_columns=False,
                height="auto",  # a fixed height hid each photo's × below the thumbnails' bottom edge
                object_fit="contain",
                allow_preview=False,
                buttons=[],
                format="png",
                elem_id=f"subject-{index}-photos",
                elem_classes=["subject-photos"],
            )
            with gr.Accordion(
                "Region (optional): a box in output pixels, or paint where it goes",
                open=False,
                elem_id=f"subject-{index}-region",
            ) as self.region:
                # whether the person has this panel open: only an open panel's editor is given a new
                # canvas when the output's size changes (a folded one takes it when opened); a canvas set
                # on a folded editor left the page unable to send it, so Generate never reached the server
                self.region_open = gr.State(False)
                with gr.Row():
                    # text fields, not gr.Number: Gradio's number field turns blank into 0 when it is first
                    # shown, which made opening this panel set a box of 0, 0, 0, 0
                    self.box = [
                        gr.Textbox(
                            label=label,
                            value="",
                            max_lines=1,
                            placeholder="pixels",
                            elem_id=f"subject-{index}-{label}",
                            min_width=60,
                        )
                        for label in ("x0", "y0", "x1", "y1")
                    ]
                # the canvas takes its size from its background (fixed_canvas off): the page sets a blank
                # one at the output's aspect ratio (``paint_canvas``), the painting stretched onto it, when
                # width or height change. It starts empty, at the square native size: Gradio's editor
                # ignores the first change after mounting, which with a starting value is the first stroke
                self.painted = region_editor(
                    value=None,
                    label="Painted region",  # short: a phone's toolbar sits beside it
                    type="numpy",
                    sources=[],
                    canvas_size=canvas_size(side, side),
                    fixed_canvas=False,
                    transforms=[],
                    layers=False,
                    brush=gr.Brush(colors=[color], color_mode="fixed", default_size=24),
                    height=300,
                    elem_id=f"subject-{index}-painted",
                    elem_classes=["region-editor"],
                )
                self.region_note = gr.Markdown(
                    "", elem_id=f"subject-{index}-region-note", elem_classes=["subject-warning"]
                )
            self.error = gr.Markdown("", elem_id=f"subject-{index}-error", elem_classes=["subject-error"])
            self.warning = gr.Markdown(
                "", elem_id=f"subject-{index}-warning", elem_classes=["subject-warning"]
            )

    @property
    def inputs(self) -> list:
        return [self.name, self.photos, self.strength, *self.box, self.painted] + (
            [self.adapter] if self.adapter is not None else []
        )

    @property
    def fields(self) -> list:
        """What a reset sets: the inputs, then the three message lines."""
        return [*self.inputs, self.error, self.warning, self.region_note]

    def blank(self, strength: float) -> list:
        """Values of ``fields`` for an empty slot. Its editor is emptied (None), not given a canvas: this
        slot's panel may be folded, and a canvas set on a folded editor left the page unable to send it;
        opening the panel gives it one of the output's shape (``on_region_open``)."""
        return ["", None, strength, "", "", "", "", None, *self.default_adapter, "", "", ""]

    @property
    def default_adapter(self) -> list:
        """The adapter field's value for an empty slot (nothing where the slot has no choice)."""
        return [self.adapters[0]] if self.adapter is not None else []

    def canvas(self, size: tuple[int, int], mask=None) -> dict:
        """The value of ``painted`` for an output of ``size`` (width, height), ``mask`` painted on it."""
        return paint_canvas(*size, mask, self.color)

    def form(self, values: dict) -> SubjectForm:
        return SubjectForm(
            name=values[self.name] or "",
            photos=gallery_paths(values[self.photos]),
            strength=values[self.strength],
            box=[values[field] for field in self.box],
            painted=values[self.painted],
            adapter=None if self.adapter is None else values[self.adapter],
        )


def build_app(
    pipe,
    limits: Limits | None = None,
    models=None,
    default_steps: int = 30,
    results_dir: str | Path | None = None,
    compiled: bool = False,
) -> gr.Blocks:
    """The page around a loaded pipeline. limits: what one request may ask (default: around the model's
    native size); models: the loaded models, shown at the top: a ``mipadapter.recipe.ModelRecord``
    (then every image is served as a PNG carrying its recipe, written under ``results_dir``, a private
    temporary folder by default) or a plain dict of names (no recipe). compiled: the UNet was compiled
    (``MIPAdapterPipeline.compile``): routing maps are not recorded, which would break its graph."""
    limits = limits or Limits.for_pipeline(pipe)
    record = models if hasattr(models, "to_dict") else None
    if record is not None and results_dir is None:
        results_dir = results_folder()
    config = pipe.adapter.config
    side = native_side(pipe)
    lock = threading.Lock()  # belt and braces beside the queue's concurrency limit of 1

    # uploads and results older than an hour are deleted, hourly
    with gr.Blocks(title="MIP-Adapter demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# MIP-Adapter: several subjects in one image\n"
            "Give each subject a name that the prompt uses and one or more photos; each photo goes to "
            "where its name is relevant, or to the region you give it. The routing maps show where each "
            "subject went."
        )
        gr.Markdown(model_line(pipe, models, compiled), elem_id="models")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a cat wearing a backpack on a sunny beach",
                    lines=2,
                    elem_id="prompt",
                )
                example_specs = examples(side)
                with gr.Row():
                    example_buttons = [
                        gr.Button(label, size="sm", elem_id=f"example-{index}")
                        for index, label in enumerate(example_specs)
                    ]
                slots = [
                    _Slot(index, config.default_scale, index < VISIBLE_AT_START, side, adapter_choices(pipe))
                    for index in range(limits.max_subjects)
                ]
                count = gr.State(min(VISIBLE_AT_START, limits.max_subjects))
                with gr.Row():
                    add = gr.Button("+ Add subject", size="sm", elem_id="add-subject")
                    remove = gr.Button("− Remove last subject", size="sm", elem_id="remove-subject")
                slots_note = gr.Markdown("", elem_id="slots-note", elem_classes=["subject-error"])
            with gr.Column(scale=2):
                first_preview = region_preview([], side, side)
                with gr.Group():
                    gr.Markdown("**Regions on the canvas**, each subject in its colour", padding=True)
                    preview = gr.Image(
                        first_preview.image,
                        show_label=False,
                        type="pil",
                        format="png",
                        interactive=False,
                        buttons=[],
                        height=220,
                        elem_id="region-preview",
                    )
                    preview_summary = gr.Markdown(
                        first_preview.summary, elem_id="region-summary", padding=True
                    )
                with gr.Group():
                    rule = gr.Dropdown(
                        offered_rules(pipe),  # no official on FLUX: no FLUX adapter has its text weight
                        value=first_rule(pipe),
                        label="Merge rule",
                        elem_id="rule",
                    )
                    with gr.Row():
                        seed = unchecked(gr.Number(420, label="Seed", precision=0, elem_id="seed"))
                        steps = unchecked(
                            gr.Slider(
                                1,
                                limits.max_steps,
                                value=min(default_steps, limits.max_steps),
                                step=1,
                                label="Steps",
                                elem_id="steps",
                            )
                        )
                    with gr.Row():
                        width = unchecked(
                            gr.Slider(
                                limits.min_side,
                                limits.max_side,
                                value=side,
                                step=limits.side_multiple,
                                label="Width",
                                elem_id="width",
                            )
                        )
                        height = unchecked(
                            gr.Slider(
                                limits.min_side,
                                limits.max_side,
                                value=side,
                                step=limits.side_multiple,
                                label="Height",
                                elem_id="height",
                            )
                        )
                    num_images = unchecked(
                        gr.Slider(1, limits.max_images, value=1, step=1, label="Images", elem_id="num-images")
                    )
                    numbers_note = gr.Markdown(
                        "", elem_id="numbers-note", elem_classes=["subject-warning"], padding=True
                    )
                with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                    flux = takes_true_cfg(pipe)
                    negative_prompt = gr.Textbox(
                        getattr(pipe, "default_negative_prompt", None) or "",
                        label="Negative prompt (FLUX: used only with a true CFG above 1; empty: an empty one)"
                        if flux
                        else "Negative prompt (the loaded preset's; empty: none)",
                        lines=2,
                        elem_id="negative-prompt",
                    )
                    true_cfg = (
                        unchecked(
                            gr.Number(
                                1.0,
                                label="True CFG (FLUX: 1 = off; above 1 a second pass against the negative prompt, "
                                "diffusers' XLabs example uses 4)",
                                minimum=1,
                                maximum=limits.max_guidance,
                                elem_id="true-cfg",
                            )
                        )
                        if flux
                        else None
                    )
                    with gr.Row():
                        guidance = unchecked(
                            gr.Number(
                                default_guidance(pipe),
                                label="Guidance (the model's default shown)",
                                minimum=0,
                                maximum=limits.max_guidance,
                                elem_id="guidance",
                            )
                        )
                        default_strength = unchecked(
                            gr.Number(
                                config.default_scale,
                                label="Image scale (sets every subject's strength)",
                                minimum=0,
                                maximum=1.5,
                                step=0.05,
                                elem_id="default-strength",
                            )
                        )
                    with gr.Row():
                        region_mode = gr.Radio(
                            [mode.value for mode in RegionMode],
                            value=RegionMode.REPLACE.value,
                            label="A region replaces or multiplies the routing map",
                            elem_id="region-mode",
                        )
                        multi_image = gr.Radio(
                            [mode.value for mode in MultiImageMode],
                            value=MultiImageMode.MEAN.value,
                            label="Several photos of a subject",
                            elem_id="multi-image",
                        )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                # Gradio's queue runs a page's clicks one at a time in click order, but while one of them
                # shows its progress, the later ones cannot show their place in the queue: this line does
                gr.HTML(f"<p id='{QUEUE_NOTE}'></p>", elem_id="queue-note", padding=False)
                status = gr.Markdown("", elem_id="status")
                images = gr.Gallery(
                    label="Images" + (" (a saved PNG carries its recipe)" if record is not None else ""),
                    columns=2,
                    height="auto",
                    object_fit="contain",  # every image whole, whatever its aspect ratio
                    format="png",
                    buttons=["download", "download_all", "fullscreen"],
                    elem_id="images",
                    interactive=False,
                )
                maps = gr.Gallery(
                    label="Routing maps (where each subject's photos went)"
                    + (": off, the UNet is compiled" if compiled else ""),
                    columns=2,
                    height="auto",
                    object_fit="contain",  # every image whole, whatever its aspect ratio
                    format="png",
                    buttons=["download", "fullscreen"],
                    elem_id="maps",
                    interactive=False,
                )
                history = gr.Gallery(
                    label="This page's results, newest first",
                    columns=4,
                    fit_columns=False,
                    height="auto",
                    object_fit="contain",  # every image whole, whatever its aspect ratio
                    format="png",
                    buttons=["download", "fullscreen"],
                    elem_id="history",
                    interactive=False,
                )
        page_history = PageHistory()

        def on_page_closed(request: gr.Request) -> None:
            page_history.drop(request.session_hash)

        app.unload(on_page_closed)
        errors = [slot.error for slot in slots]
        warnings = [slot.warning for slot in slots]

        def on_generate(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
            shown = values[count]
            asked = GenerateRequest(
                prompt=values[prompt] or "",
                subjects=[slot.form(values) for slot in slots[:shown]],
                rule=values[rule],
                # as typed: the handler refuses what the CLI refuses, with its message, before the model runs
                seed=420 if values[seed] is None else page_number(values[seed]),
                steps=page_number(values[steps]),
                width=page_number(values[width]),
                height=page_number(values[height]),
                num_images=page_number(values[num_images]),
                negative_prompt=values[negative_prompt] or "",  # empty: none (the preset's is shown)
                guidance=values[guidance],
                region_mode=values[region_mode],
                multi_image=values[multi_image],
                true_cfg_scale=None if true_cfg is None else values[true_cfg],
            )
            page = request.session_hash
            progress(0.0, desc="waiting for the model")

            def report(step: int, total: int) -> None:
                progress((step, total), desc="denoising", unit="steps")

            cleared = {**{e: "" for e in errors}, **{w: "" for w in warnings}}
            with lock:
                try:
                    if results_dir is not None:
                        drop_old_results(Path(results_dir))
                    result = generate(
                        pipe,
                        asked,
                        limits,
                        progress=report,
                        models=record,
                        output_dir=results_dir,
                        routing_maps=not compiled,
                    )
                except Exception as error:  # an unexpected failure: one line on the page, details in the log
                    logger.exception("generation failed")
                    message = f"Generation failed: {type(error).__name__}: {error}"
                    shown = page_history.add(page, [], "")
                    return {images: [], maps: [], status: f"**{plain(message)}**", history: shown, **cleared}
            outputs = {
                images: result.images,
                maps: result.maps,
                status: plain(result.status) if result.ok else f"**{plain(result.status)}**",
                history: page_history.add(page, result.images, f"seed {asked.seed}"),
                **cleared,
            }
            for index, (error, warning) in enumerate(zip(errors, warnings, strict=True)):
                if index in result.subject_errors:
                    outputs[error] = f"⚠ {plain(result.subject_errors[index])}"
                if index in result.subject_warnings:
                    outputs[warning] = f"⚠ Warning: {plain(result.subject_warnings[index])}"
            return outputs

        run.click(None, js=QUEUE_CLICK_JS, queue=False, trigger_mode="multiple", api_visibility="private")
        run.click(
            on_generate,
            inputs={prompt, rule, seed, steps, width, height, num_images, count}
            | {negative_prompt, guidance, region_mode, multi_image}
            | ({true_cfg} if true_cfg is not None else set())
            | {component for slot in slots for component in slot.inputs},
            outputs=[images, maps, status, history, *errors, *warnings],
            concurrency_limit=1,
            concurrency_id="model",
            trigger_mode="multiple",  # a click while one runs waits in the queue, never dropped
            api_name="generate",
        ).then(None, js=QUEUE_DONE_JS, queue=False, show_progress="hidden", api_visibility="private")

        # what each slot's preview shows and the size it was drawn for, kept per page (``SlotRegion``):
        # the page's events carry only what they watch (no event but a stroke exports a canvas), and
        # what changed is told by comparing with it, not by the event's target (see ``SlotRegion``)
        regions = gr.State(
            {"size": preview_size(side, side, side, limits)[0], "slots": [SlotRegion()] * len(slots)}
        )

        def canvas_follows(slot: _Slot, painted, size: tuple[int, int]) -> dict:
            """The slot's canvas at the aspect ratio of an output of ``size`` (width, height), what is
            painted on it stretched along (said so at the slot); nothing when it is already that size, or
            its painting cannot be read (the preview says why)."""
            try:
                mask = painted_mask(painted, limits.max_painted_pixels)
            except ValueError:
                return {}
            if mask is None:  # blank, or never shown: its size is unknown, it is set
                return {slot.painted: slot.canvas(size)}
            if mask.shape == canvas_size(*size)[::-1]:
                return {}
            return {slot.painted: slot.canvas(size, mask), slot.region_note: plain(paint_stretched(*size))}

        def settle(kept: list[SlotRegion], index: int, outputs: dict, **changes) -> None:
            """Slot ``index`` after an event carrying ``changes`` (``settle_region``); a cleared box or
            painting is cleared on the page too, with a note (otherwise the note stays: clearing a field
            changes it too, and the note would flash)."""
            slot = slots[index]
            kept[index], cleared = settle_region(
                kept[index], max_painted_pixels=limits.max_painted_pixels, **changes
            )
            if cleared == "box":
                outputs.update({field: "" for field in slot.box})
                outputs[slot.region_note] = plain(BOX_CLEARED)
            elif cleared == "painted":
                # None, not a blank canvas: a set value comes back once with the old layers
                outputs[slot.painted] = None
                outputs[slot.region_note] = plain(PAINT_CLEARED)

        def drawn(kept: list[SlotRegion], shown: int, out_width, out_height) -> dict:
            """The preview and its summary of the first ``shown`` slots as kept."""
            size, refused = preview_size(out_width, out_height, side, limits)
            forms = [
                SubjectForm(name=region.name, box=list(region.box), painted=region.painted)
                for region in kept[:shown]
            ]
            drawing = region_preview(forms, *size, max_painted_pixels=limits.max_painted_pixels)
            summary = drawing.summary if refused is None else f"{plain(refused)}  \n{drawing.summary}"
            return {preview: drawing.image, preview_summary: summary}

        def on_fields_change(page, shown, out_width, out_height, *opened_and_fields):
            """A name, box field, width or height changed: redraw the preview; a box typed where a region
            is painted clears the painting; a new width or height gives every open panel's canvas the
            output's aspect ratio, a painting stretched along (a folded one takes it when opened:
            ``on_region_open``)."""
            opened, fields = opened_and_fields[: len(slots)], opened_and_fields[len(slots) :]
            kept, outputs = list(page["slots"]), {}
            size, refused = preview_size(out_width, out_height, side, limits)
            resized = refused is None and size != page["size"]
            for index in range(len(slots)):  # hidden ones too: a removed slot's emptied fields are kept
                name, *box = fields[index * 5 : (index + 1) * 5]
                if resized and opened[index] and index < shown:
                    outputs.update(canvas_follows(slots[index], kept[index].painted, size))
                settle(kept, index, outputs, name=name, box=box)
            page = {"size": size if refused is None else page["size"], "slots": kept}
            return {regions: page, **drawn(kept, shown, out_width, out_height), **outputs}

        def on_slots_change(page, shown, out_width, out_height):
            """After the slots themselves changed (one added or removed, an example loaded): redraw the
            preview. The fields they set bring ``regions`` up to date through their own change events:
            the example button once wrote ``regions`` itself, and the page then sent uploads in a loop (a
            browser test; the cause lies in Gradio's page and was not found)."""
            return drawn(page["slots"], shown, out_width, out_height)

        preview_outputs = [regions, preview, preview_summary]
        in_preview_queue = dict(  # in the queue, one at a time (it decodes painted layers), never beside it
            queue=True,
            concurrency_limit=1,
            concurrency_id="preview",
            show_progress="hidden",
            api_visibility="private",
        )
        gr.on(
            [width.change, height.change]
            + [t for slot in slots for t in (slot.name.change, *(f.change for f in slot.box))],
            on_fields_change,
            inputs=[regions, count, width, height, *(slot.region_open for slot in slots)]
            + [c for slot in slots for c in (slot.name, *slot.box)],
            outputs=preview_outputs
            + [c for slot in slots for c in (*slot.box, slot.painted, slot.region_note)],
            trigger_mode="always_last",
            **in_preview_queue,
        )
        for index, slot in enumerate(slots):

            def on_painted_change(page, shown, out_width, out_height, painted, index=index):
                """Slot ``index``'s painting changed: redraw the preview; a painting where a box is typed
                clears the box."""
                kept, outputs = list(page["slots"]), {}
                settle(kept, index, outputs, painted=painted)
                return {
                    regions: {**page, "slots": kept},
                    **drawn(kept, shown, out_width, out_height),
                    **outputs,
                }

            slot.painted.change(
                on_painted_change,
                inputs=[regions, count, width, height, slot.painted],
                outputs=preview_outputs + [*slot.box, slot.region_note],
                trigger_mode="always_last",
                **in_preview_queue,
            )
        # what every change of the subjects' slots (adding, removing, an example) runs after itself
        refresh_preview = dict(
            fn=on_slots_change,
            inputs=[regions, count, width, height],  # no canvas: what the slots hold is kept in ``regions``
            outputs=[preview, preview_summary],
            **in_preview_queue,
        )

        for slot in slots:

            def on_region_open(out_width, out_height, painted, slot=slot):
                """A region panel opened: its canvas takes the output's shape (an editor never shown before
                ignores the canvases set while it was folded away)."""
                size, refused = preview_size(out_width, out_height, side, limits)
                followed = {} if refused is not None else canvas_follows(slot, painted, size)
                return {slot.region_open: True, **followed}

            slot.region.expand(
                on_region_open,
                inputs=[width, height, slot.painted],
                outputs=[slot.painted, slot.region_note, slot.region_open],
                **in_preview_queue,
            )
            slot.region.collapse(
                lambda: False, outputs=slot.region_open, queue=False, api_visibility="private"
            )

        def keeps_to_its_scale(slider, check, note):
            """A number typed into ``slider`` off its scale is replaced by the nearest one on it (what the
            slider itself would send), and ``note`` says so in the CLI's words (``check``'s message)."""

            def snap(value):
                try:
                    check(page_number(value))
                except LimitError as error:
                    nearest = on_slider(value, slider.minimum, slider.maximum, slider.step)
                    return nearest, plain(f"{error}: set to {nearest:g}.")
                return gr.update(), gr.update()  # the note stays: the value it set changes the field too

            slider.change(snap, inputs=slider, outputs=[slider, note], queue=False, api_visibility="private")

        for slider, check in (
            (width, lambda value: check_side(value, "The width", limits)),
            (height, lambda value: check_side(value, "The height", limits)),
            (steps, lambda value: check_steps(value, "Steps", limits)),
            (num_images, lambda value: check_images(value, "Images", limits)),
        ):
            keeps_to_its_scale(slider, check, numbers_note)
        for index, slot in enumerate(slots):
            keeps_to_its_scale(
                slot.strength,
                lambda value, index=index: check_scale(value, f"The strength of subject {index + 1}", limits),
                slot.warning,
            )

        def photos_checker(index: int):
            def check(photos):
                """A photo over the size limit is named at its subject as soon as it is uploaded."""
                problems = []
                for path in gallery_paths(photos):
                    try:
                        check_upload_size(path, limits)
                    except ValueError as error:
                        problems.append(f"Photo of subject {index + 1}: {error}.")
                return f"⚠ {plain(' '.join(problems))}" if problems else ""

            return check

        for index, slot in enumerate(slots):
            slot.photos.upload(
                photos_checker(index),
                inputs=slot.photos,
                outputs=slot.error,
                queue=False,
                api_visibility="private",
            )

        def on_default_strength(value):
            value = config.default_scale if value is None else value
            return [value for _ in slots]

        default_strength.input(
            on_default_strength,
            inputs=default_strength,
            outputs=[slot.strength for slot in slots],
            queue=False,
            api_visibility="private",
        )

        for slot in slots:  # picking an adapter sets the subject's strength to that adapter's default
            if slot.adapter is not None:
                slot.adapter.input(
                    lambda name: adapter_scale(pipe, name),
                    inputs=slot.adapter,
                    outputs=slot.strength,
                    queue=False,
                    api_visibility="private",
                )

        def on_add(shown: int):
            if shown >= limits.max_subjects:
                note = f"⚠ Too many subjects: this server takes at most {limits.max_subjects}."
                return [shown, note, *[gr.update() for _ in slots]]
            return [shown + 1, "", *[gr.update(visible=i < shown + 1) for i in range(len(slots))]]

        add.click(
            on_add,
            inputs=count,
            outputs=[count, slots_note, *[slot.group for slot in slots]],
            queue=False,
            api_visibility="private",
        ).then(**refresh_preview)

        slot_fields = [c for slot in slots for c in slot.fields]

        def on_remove(shown: int, strength: float | None):
            shown = max(1, shown - 1)
            strength = config.default_scale if strength is None else strength
            groups = [gr.update(visible=index < shown) for index in range(len(slots))]
            fields = []
            for index, slot in enumerate(slots):  # hidden slots are emptied, the others left as they are
                fields += slot.blank(strength) if index >= shown else [gr.update() for _ in slot.fields]
            return [shown, "", *groups, *fields]

        remove.click(
            on_remove,
            inputs=[count, default_strength],
            outputs=[count, slots_note, *[slot.group for slot in slots], *slot_fields],
            queue=False,
            api_visibility="private",
        ).then(**refresh_preview)

        for button, spec in zip(example_buttons, example_specs.values(), strict=True):

            def load_example(strength: float | None, spec=spec):
                strength = config.default_scale if strength is None else strength
                chosen = spec["subjects"][: limits.max_subjects]
                values = [spec["prompt"], len(chosen), ""]
                for index in range(len(slots)):
                    values.append(gr.update(visible=index < max(len(chosen), 1)))
                opened = [index < len(chosen) and chosen[index][2] is not None for index in range(len(slots))]
                values += [gr.update(open=is_open) for is_open in opened]  # an example's boxes are shown
                values += opened  # the panels' states (``_Slot.region_open``)
                for index, slot in enumerate(slots):
                    if index >= len(chosen):
                        values += slot.blank(strength)
                        continue
                    name, photo, box = chosen[index]
                    box_text = [str(value) for value in box] if box else [""] * 4
                    values += [name, [str(photo)], strength, *box_text, None]  # see blank
                    values += [*slot.default_adapter, "", "", ""]
                return values + [[], [], "", side, side]  # boxes are in pixels of the native size

            button.click(
                load_example,
                inputs=default_strength,
                outputs=[prompt, count, slots_note, *[slot.group for slot in slots]]
                + [slot.region for slot in slots]
                + [slot.region_open for slot in slots]
                + slot_fields
                + [images, maps, status, width, height],
                queue=False,
                api_visibility="private",
            ).then(**refresh_preview)
    return app


def stop_on_sigterm() -> None:
    """Make SIGTERM stop a blocking ``launch`` as Ctrl+C does (the server closes, the process exits and
    its results folder is removed); only the main thread can install it (elsewhere: nothing done)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_file_size: int = 10 * 2**20,
    queue_size: int = 16,
    block: bool = True,
    limits: Limits | None = None,
    allowed_hosts: tuple[str, ...] = (),
) -> str:
    """Serve ``app`` (one generation at a time, at most ``queue_size`` waiting) and return its URL.

    Every request passes ``guard.RequestGuard`` first (Host and Origin checks, the Host one only on a
    loopback ``host``, where ``allowed_hosts`` adds names to the loopback ones; upload limits per session
    from ``limits``; uploads served only to their session);
    queued events (generation, preview) are reachable only through the queue, not the REST routes.
    block: keep serving until interrupted by Ctrl+C or SIGTERM (otherwise return at once, the server
    running in a thread). max_file_size: the largest photo; a larger one is taken up to the session's
    upload budget (``limits.max_session_upload_bytes``) so that the page says why it is refused (the
    handler's "N MB; the limit is …" at its subject) instead of Gradio's bare "Error".
    """
    from starlette.middleware import Middleware

    app.queue(max_size=queue_size, default_concurrency_limit=1, api_open=False)
    guard = Middleware(
        RequestGuard, limits=limits or Limits(), exposed=not is_loopback(host), allowed_hosts=allowed_hosts
    )
    if block:
        stop_on_sigterm()
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        max_file_size=max(max_file_size, (limits or Limits()).max_session_upload_bytes),
        allowed_paths=[str(EXAMPLES)],
        share=False,
        ssr_mode=False,
        mcp_server=False,
        show_error=False,
        quiet=True,
        inbrowser=False,
        prevent_thread_lock=True,
        footer_links=[],
        css=CSS,
        app_kwargs={"middleware": [guard]},
    )
    print(f"mipadapter web: serving {url} (Ctrl+C to stop)", flush=True)
    if block:
        app.block_thread()
    return url
