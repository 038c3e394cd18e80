"""The page's region editor: Gradio's ImageEditor, keeping what a request may cost bounded.

Gradio's own editor decodes every layer, the background and the flattened composite of each event
before the handler runs, so a small PNG of 9000×9000 pixels costs gigabytes before any check; and it
keeps the layers a page sends ahead of its event (``accept_blobs``) in memory, under any number of ids
and layer indices. ``region_editor`` gives an editor that hands the painted layers on undecoded (PNG
bytes, or the uploaded file's path) to ``handler.painted_mask``, which checks their pixel count from the
header first; it keeps layers only (the background and composite are never used), at most
``MAX_LAYERS`` of at most ``MAX_LAYER_BYTES`` per event and ``MAX_PENDING`` events waiting, the oldest
dropped beyond that.

How: Gradio's own class, its two methods replaced on the class by ones that act as described for an
editor carrying ``REGION_EDITOR_CLASS`` among its ``elem_classes`` and call Gradio's own for any other.
Not on the instance: Gradio rebuilds a page's copy of a component from its constructor arguments
whenever an event lists it as an output and leaves it as it is, which drops whatever was set on the
instance (the rebuilt one keeps its ``elem_classes``). Not a subclass: a subclass of a Gradio component
makes Gradio write a ``.pyi`` stub beside this module at import time. The layers waiting for their event
are kept here, per ``elem_id``, so that a rebuilt editor finds those sent to the one before it.
"""

from __future__ import annotations

from collections import OrderedDict

import gradio as gr
from gradio.components.base import server
from gradio.components.image_editor import AcceptBlobs, EditorData, EditorDataBlobs

MAX_LAYERS = 4
"""Layers kept per event (the page's editor has one)."""
MAX_PENDING = 16
"""Events whose layers wait in memory for the event itself, per editor; older ones are dropped."""
MAX_LAYER_BYTES = 2 * 2**20
"""A layer's PNG larger than this is not kept (the page's canvas, at most 256×256, sends at most 256 kB)."""
REGION_EDITOR_CLASS = "mipadapter-region-editor"
"""The ``elem_classes`` entry that makes an ImageEditor a region editor (see the module's docstring)."""

_pending: dict[str, OrderedDict[str, EditorDataBlobs]] = {}
_gradios_own: dict[str, object] = {}


def region_editor(*, elem_id: str, **kwargs) -> gr.ImageEditor:
    """A ``gr.ImageEditor`` (``kwargs`` as for it; ``elem_id`` names it on the page and keys its waiting
    layers) whose value reaches the handler as ``{"background": None, "layers": [PNG bytes or file path,
    …], "composite": None}``, nothing decoded."""
    _install()
    classes = _as_list(kwargs.pop("elem_classes", None))
    return gr.ImageEditor(elem_id=elem_id, elem_classes=[*classes, REGION_EDITOR_CLASS], **kwargs)


def is_region_editor(editor: gr.ImageEditor) -> bool:
    return REGION_EDITOR_CLASS in _as_list(editor.elem_classes) and bool(editor.elem_id)


def _as_list(classes: list[str] | str | None) -> list[str]:
    """``elem_classes`` as Gradio takes it (one name, several, or None) → a list."""
    return [classes] if isinstance(classes, str) else list(classes or [])


def pending_layers(editor: gr.ImageEditor) -> OrderedDict[str, EditorDataBlobs]:
    """The layers sent ahead of their events to ``editor`` (a region editor), by the page's event id,
    oldest first."""
    return _pending.setdefault(editor.elem_id, OrderedDict())


def _install() -> None:
    """Put the two methods on Gradio's class, once."""
    if _gradios_own:
        return
    _gradios_own.update(accept_blobs=gr.ImageEditor.accept_blobs, preprocess=gr.ImageEditor.preprocess)
    gr.ImageEditor.accept_blobs = accept_blobs
    gr.ImageEditor.preprocess = preprocess


@server
def accept_blobs(editor: gr.ImageEditor, data: AcceptBlobs) -> None:
    """A layer the page sends ahead of its event; anything else (background, composite, a layer index
    beyond ``MAX_LAYERS``, a PNG above ``MAX_LAYER_BYTES``) is not kept."""
    if not is_region_editor(editor):
        return _gradios_own["accept_blobs"](editor, data)
    if data.data.get("type") != "layer" or not data.files or len(data.files[0][1]) > MAX_LAYER_BYTES:
        return None
    try:
        index = int(data.data.get("index"))
    except (TypeError, ValueError):
        return None
    if not 0 <= index < MAX_LAYERS:
        return None
    key, waiting = str(data.data.get("id")), pending_layers(editor)
    stored = waiting.pop(key, None) or EditorDataBlobs(background=None, layers=[], composite=None)
    stored.layers.extend([None] * (index + 1 - len(stored.layers)))
    stored.layers[index] = data.files[0][1]
    waiting[key] = stored
    while len(waiting) > MAX_PENDING:
        waiting.popitem(last=False)
    return None


def preprocess(editor: gr.ImageEditor, payload: EditorData | None):
    """The painted layers as sent (PNG bytes, or the path of an uploaded file), undecoded."""
    if not is_region_editor(editor):
        return _gradios_own["preprocess"](editor, payload)
    if payload is None:
        return None
    if payload.id is not None:
        stored = pending_layers(editor).pop(payload.id, None)
        layers = list(stored.layers) if stored is not None else []
    else:
        layers = [layer.path for layer in payload.layers[:MAX_LAYERS]]
    return {"background": None, "layers": [layer for layer in layers if layer is not None], "composite": None}
