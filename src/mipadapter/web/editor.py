"""The page's region editor: Gradio's ImageEditor, keeping what a request may cost bounded.

Gradio's own editor decodes every layer, the background and the flattened composite of each event
before the handler runs, so a small PNG of 9000×9000 pixels costs gigabytes before any check; and it
keeps the layers a page sends ahead of its event (``accept_blobs``) in memory, under any number of ids
and layer indices. ``region_editor`` gives an editor that hands the painted layers on undecoded (PNG
bytes, or the uploaded file's path) to ``handler.painted_mask``, which checks their pixel count from the
header first; it keeps layers only (the background and composite are never used), at most
``MAX_LAYERS`` of at most ``MAX_LAYER_BYTES`` per event and ``MAX_PENDING`` events waiting, the oldest
dropped beyond that.

The editor is Gradio's own class with these two methods replaced on the instance: a subclass of a
Gradio component makes Gradio write a ``.pyi`` stub beside this module at import time.
"""

from __future__ import annotations

from collections import OrderedDict
from types import MethodType

import gradio as gr
from gradio.components.base import server
from gradio.components.image_editor import AcceptBlobs, EditorData, EditorDataBlobs

MAX_LAYERS = 4
"""Layers kept per event (the page's editor has one)."""
MAX_PENDING = 16
"""Events whose layers wait in memory for the event itself; older ones are dropped."""
MAX_LAYER_BYTES = 2 * 2**20
"""A layer's PNG larger than this is not kept (the page's canvas, at most 256×256, sends at most 256 kB)."""


def region_editor(**kwargs) -> gr.ImageEditor:
    """A ``gr.ImageEditor`` (``kwargs`` as for it) whose value reaches the handler as
    ``{"background": None, "layers": [PNG bytes or file path, …], "composite": None}``, nothing decoded."""
    editor = gr.ImageEditor(**kwargs)
    editor.blob_storage = OrderedDict()
    editor.accept_blobs = MethodType(accept_blobs, editor)
    editor.preprocess = MethodType(preprocess, editor)
    return editor


@server
def accept_blobs(editor: gr.ImageEditor, data: AcceptBlobs) -> None:
    """A layer the page sends ahead of its event; anything else (background, composite, a layer index
    beyond ``MAX_LAYERS``, a PNG above ``MAX_LAYER_BYTES``) is not kept."""
    if data.data.get("type") != "layer" or not data.files or len(data.files[0][1]) > MAX_LAYER_BYTES:
        return
    try:
        index = int(data.data.get("index"))
    except (TypeError, ValueError):
        return
    if not 0 <= index < MAX_LAYERS:
        return
    key = str(data.data.get("id"))
    stored = editor.blob_storage.pop(key, None) or EditorDataBlobs(background=None, layers=[], composite=None)
    stored.layers.extend([None] * (index + 1 - len(stored.layers)))
    stored.layers[index] = data.files[0][1]
    editor.blob_storage[key] = stored
    while len(editor.blob_storage) > MAX_PENDING:
        editor.blob_storage.popitem(last=False)


def preprocess(editor: gr.ImageEditor, payload: EditorData | None) -> dict | None:
    """The painted layers as sent (PNG bytes, or the path of an uploaded file), undecoded."""
    if payload is None:
        return None
    if payload.id is not None:
        stored = editor.blob_storage.pop(payload.id, None)
        layers = list(stored.layers) if stored is not None else []
    else:
        layers = [layer.path for layer in payload.layers[:MAX_LAYERS]]
    return {"background": None, "layers": [layer for layer in layers if layer is not None], "composite": None}
