"""The Gradio page: widgets in, ``handler.generate`` called, images and routing maps out.

``build_app(pipe)`` lays the page out around a loaded ``MIPAdapterPipeline`` (models are loaded once, by
the caller); ``launch(app, host, port)`` serves it with one generation at a time. Everything a person
can get wrong is checked by the handler and shown next to the subject it concerns.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check

import gradio as gr  # noqa: E402

from mipadapter.config import MergeRule  # noqa: E402
from mipadapter.figures import PALETTE  # noqa: E402
from mipadapter.web.handler import (  # noqa: E402
    GenerateRequest,
    Limits,
    SubjectForm,
    generate,
    native_side,
)

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parent / "examples"
VISIBLE_AT_START = 2

CSS = """
.subject-error, .subject-error p { color: #b3261e !important; font-weight: 600; }
#status p { font-size: 1.05em; }
.subject-title h3 { margin: 0; }
#images .fixed-height, #maps .fixed-height { min-height: 160px !important; max-height: none !important; }
"""


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


class _Slot:
    """The widgets of one subject slot."""

    def __init__(self, index: int, default_scale: float, visible: bool) -> None:
        color = _hex(PALETTE[index % len(PALETTE)])
        with gr.Group(visible=visible) as self.group:
            gr.Markdown(f"<h3 style='color:{color}'>Subject {index + 1}</h3>", elem_classes=["subject-title"])
            with gr.Row():
                self.name = gr.Textbox(
                    label="Name (as written in the prompt)",
                    placeholder="e.g. cat",
                    elem_id=f"subject-{index}-name",
                    scale=2,
                )
                self.strength = gr.Slider(
                    0.0,
                    1.5,
                    value=default_scale,
                    step=0.05,
                    label="Strength",
                    elem_id=f"subject-{index}-strength",
                    scale=1,
                )
            self.photos = gr.File(
                label="Photos (one or more)",
                file_count="multiple",
                file_types=["image"],
                type="filepath",
                height=150,
                elem_id=f"subject-{index}-photos",
            )
            with gr.Accordion("Region (optional): a box, or paint where it goes", open=False):
                with gr.Row():
                    self.box = [
                        gr.Number(label=label, value=None, precision=0, elem_id=f"subject-{index}-{label}")
                        for label in ("x0", "y0", "x1", "y1")
                    ]
                self.painted = gr.ImageEditor(
                    label="Painted region (the canvas stands for the output image)",
                    type="numpy",
                    sources=[],
                    canvas_size=(256, 256),
                    fixed_canvas=True,
                    transforms=[],
                    layers=False,
                    brush=gr.Brush(colors=[color], color_mode="fixed", default_size=24),
                    height=300,
                    elem_id=f"subject-{index}-painted",
                )
            self.error = gr.Markdown("", elem_id=f"subject-{index}-error", elem_classes=["subject-error"])

    @property
    def inputs(self) -> list:
        return [self.name, self.photos, self.strength, *self.box, self.painted]

    def form(self, values: dict) -> SubjectForm:
        return SubjectForm(
            name=values[self.name] or "",
            photos=values[self.photos] or [],
            strength=values[self.strength],
            box=[values[field] for field in self.box],
            painted=values[self.painted],
        )


def build_app(
    pipe, limits: Limits | None = None, models: dict | None = None, default_steps: int = 30
) -> gr.Blocks:
    """The page around a loaded pipeline. limits: what one request may ask (default: around the model's
    native size); models: names shown at the top (base model, adapter, image encoder)."""
    limits = limits or Limits.for_pipeline(pipe)
    config = pipe.adapter.config
    side = native_side(pipe)
    lock = threading.Lock()  # belt and braces beside the queue's concurrency limit of 1

    # uploads and results older than an hour are deleted, hourly
    with gr.Blocks(title="MIP-Adapter demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(
            "# MIP-Adapter: several subjects in one image\n"
            "Give each subject a name that the prompt uses and one or more photos; each photo goes to "
            "where its name is relevant. The routing maps show where each subject went."
            + (
                "\n\nModels: "
                + ", ".join(f"{key.replace('_', ' ')} `{value}`" for key, value in models.items())
                if models
                else ""
            )
        )
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
                    _Slot(index, config.default_scale, index < VISIBLE_AT_START)
                    for index in range(limits.max_subjects)
                ]
                count = gr.State(min(VISIBLE_AT_START, limits.max_subjects))
                with gr.Row():
                    add = gr.Button("+ Add subject", size="sm", elem_id="add-subject")
                    remove = gr.Button("− Remove last subject", size="sm", elem_id="remove-subject")
                slots_note = gr.Markdown("", elem_id="slots-note", elem_classes=["subject-error"])
            with gr.Column(scale=2):
                with gr.Group():
                    rule = gr.Dropdown(
                        [rule.value for rule in MergeRule],
                        value=config.default_rule.value,
                        label="Merge rule",
                        elem_id="rule",
                    )
                    with gr.Row():
                        seed = gr.Number(420, label="Seed", precision=0, elem_id="seed")
                        steps = gr.Slider(
                            1,
                            limits.max_steps,
                            value=min(default_steps, limits.max_steps),
                            step=1,
                            label="Steps",
                            elem_id="steps",
                        )
                    with gr.Row():
                        width = gr.Slider(
                            limits.min_side,
                            limits.max_side,
                            value=side,
                            step=limits.side_multiple,
                            label="Width",
                            elem_id="width",
                        )
                        height = gr.Slider(
                            limits.min_side,
                            limits.max_side,
                            value=side,
                            step=limits.side_multiple,
                            label="Height",
                            elem_id="height",
                        )
                    num_images = gr.Slider(
                        1, limits.max_images, value=1, step=1, label="Images", elem_id="num-images"
                    )
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown("", elem_id="status")
                images = gr.Gallery(
                    label="Images",
                    columns=2,
                    height="auto",
                    format="png",
                    elem_id="images",
                    interactive=False,
                )
                maps = gr.Gallery(
                    label="Routing maps (where each subject's photos went)",
                    columns=2,
                    height="auto",
                    format="png",
                    elem_id="maps",
                    interactive=False,
                )

        errors = [slot.error for slot in slots]

        def on_generate(values: dict, progress=gr.Progress()):  # noqa: B008 (gradio's idiom)
            shown = values[count]
            request = GenerateRequest(
                prompt=values[prompt] or "",
                subjects=[slot.form(values) for slot in slots[:shown]],
                rule=values[rule],
                seed=int(values[seed] if values[seed] is not None else 420),
                steps=int(values[steps]),
                width=int(values[width]),
                height=int(values[height]),
                num_images=int(values[num_images]),
            )
            progress(0.0, desc="waiting for the model")

            def report(step: int, total: int) -> None:
                progress((step, total), desc="denoising", unit="steps")

            with lock:
                try:
                    result = generate(pipe, request, limits, progress=report)
                except Exception as error:  # an unexpected failure: one line on the page, details in the log
                    logger.exception("generation failed")
                    message = f"Generation failed: {type(error).__name__}: {error}"
                    return {images: [], maps: [], status: f"**{message}**", **{e: "" for e in errors}}
            outputs = {
                images: result.images,
                maps: result.maps,
                status: result.status if result.ok else f"**{result.status}**",
            }
            for index, error in enumerate(errors):
                message = result.subject_errors.get(index)
                outputs[error] = f"⚠ {message}" if message else ""
            return outputs

        run.click(
            on_generate,
            inputs={prompt, rule, seed, steps, width, height, num_images, count}
            | {component for slot in slots for component in slot.inputs},
            outputs=[images, maps, status, *errors],
            concurrency_limit=1,
            concurrency_id="model",
            api_name="generate",
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
        )

        slot_fields = [c for slot in slots for c in (*slot.inputs, slot.error)]
        blank_slot = ["", None, config.default_scale, None, None, None, None, None, ""]  # as slot_fields

        def on_remove(shown: int):
            shown = max(1, shown - 1)
            groups = [gr.update(visible=index < shown) for index in range(len(slots))]
            fields = []
            for index in range(len(slots)):  # hidden slots are emptied, the others left as they are
                fields += blank_slot if index >= shown else [gr.update() for _ in blank_slot]
            return [shown, "", *groups, *fields]

        remove.click(
            on_remove,
            inputs=count,
            outputs=[count, slots_note, *[slot.group for slot in slots], *slot_fields],
            queue=False,
            api_visibility="private",
        )

        for button, spec in zip(example_buttons, example_specs.values(), strict=True):

            def load_example(spec=spec):
                chosen = spec["subjects"][: limits.max_subjects]
                values = [spec["prompt"], len(chosen), ""]
                for index in range(len(slots)):
                    values.append(gr.update(visible=index < max(len(chosen), 1)))
                for index in range(len(slots)):
                    name, photo, box = chosen[index] if index < len(chosen) else ("", None, None)
                    values += [
                        name,
                        [str(photo)] if photo else None,
                        config.default_scale,
                        *(box if box else [None] * 4),
                        None,
                        "",
                    ]
                return values + [[], [], "", side, side]  # boxes are in pixels of the native size

            button.click(
                load_example,
                outputs=[prompt, count, slots_note, *[slot.group for slot in slots]]
                + slot_fields
                + [images, maps, status, width, height],
                queue=False,
                api_visibility="private",
            )
    return app


def launch(
    app: gr.Blocks,
    host: str = "127.0.0.1",
    port: int = 7860,
    max_file_size: int = 10 * 2**20,
    queue_size: int = 16,
    block: bool = True,
) -> str:
    """Serve ``app`` (one generation at a time, at most ``queue_size`` waiting) and return its URL.

    block: keep serving until interrupted (otherwise return at once, the server running in a thread).
    """
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    _, url, _ = app.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_file_size,
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
    )
    print(f"mipadapter web: serving {url} (Ctrl+C to stop)", flush=True)
    if block:
        app.block_thread()
    return url
