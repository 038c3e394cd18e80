"""The web server's bounds, through a served app (``launch(block=False)`` on a free loopback port) and its
parts: painted layers checked before any decode, the preview inside the queue, uploads limited and kept
private to their session, foreign Host and Origin refused, the results folder removed on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mipadapter.limits import Limits
from mipadapter.testing.mip import tiny_mip_pipeline
from mipadapter.web.handler import GenerateRequest, SubjectForm, generate, painted_mask

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CAT, BACKPACK = str(ASSETS / "cat.jpg"), str(ASSETS / "backpack.jpg")
BOMB_SIDE = 9000
BOMB_MESSAGE = f"a painted layer is {BOMB_SIDE}×{BOMB_SIDE} pixels; the limit is 4 megapixels"


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A fully transparent RGBA PNG of ``width``×``height``: a few hundred kB that decode to 4·w·h bytes
    (written row by row, so making it costs no more than one row)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row, parts = zlib.compressobj(9), b"\0" * (1 + 4 * width), []
    for _ in range(height):
        parts.append(packer.compress(row))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = png_bomb()
    assert len(data) < 400_000  # small on the wire, under any upload cap
    return data


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """The sizes of the images Pillow decodes while the test runs."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(image):
        sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


@pytest.fixture(scope="module")
def pipe():
    return tiny_mip_pipeline("sdxl", "basic", text_weight=True)


# ------------------------------------------------------------------------------------- painted layers
def test_a_painted_layer_bomb_is_refused_by_its_header_before_any_decode(pipe, bomb, decoded, tmp_path):
    layer_file = tmp_path / "layer.png"
    layer_file.write_bytes(bomb)
    for layer in (bomb, str(layer_file)):  # as the page's editor passes it: PNG bytes, or an uploaded file
        forms = [SubjectForm("cat", [CAT]), SubjectForm("backpack", [BACKPACK], painted={"layers": [layer]})]
        tracemalloc.start()
        try:
            result = generate(pipe, GenerateRequest("a cat wearing a backpack", forms, steps=1))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.subject_errors == {1: f"Region of subject 'backpack': {BOMB_MESSAGE}."}, result.status
        assert result.images == [] and result.status == "Not generated. See the message at subject 2."
        assert peak < 40 * 2**20, peak  # decoding it would take 324 MB (uint8) and 1.3 GB (float32)
        assert all(width * height <= Limits.max_painted_pixels for width, height in decoded), decoded
    with pytest.raises(ValueError, match=f"^{BOMB_MESSAGE}$"):
        painted_mask({"layers": [bomb]})
    assert painted_mask({"layers": [bomb]}, max_pixels=None) is None  # the limit is what refused it


def test_a_painted_layer_at_the_limit_is_read_and_one_above_is_not(decoded):
    limit = 64 * 50
    for width, height, refused in ((64, 50, False), (65, 50, True)):
        layer = np.zeros((height, width, 4), np.uint8)
        layer[:, : width // 2, 3] = 255
        buffer = io.BytesIO()
        Image.fromarray(layer).save(buffer, format="PNG")
        for given in (buffer.getvalue(), Image.fromarray(layer), layer):
            if refused:
                message = (
                    f"a painted layer is {width}×{height} pixels; the limit is {limit / 1e6:g} megapixels"
                )
                with pytest.raises(ValueError, match=f"^{message}$"):
                    painted_mask({"layers": [given]}, max_pixels=limit)
            else:
                mask = painted_mask({"layers": [given]}, max_pixels=limit)
                assert (
                    mask.shape == (height, width)
                    and mask[:, : width // 2].min() == 1
                    and mask[:, width // 2 :].max() == 0
                )
    assert (65, 50) not in decoded


def test_the_region_editor_keeps_layers_undecoded_and_bounded(need, bomb, decoded):
    need("gradio")
    from gradio.components.image_editor import AcceptBlobs, EditorData
    from gradio.data_classes import FileData

    from mipadapter.web.editor import MAX_LAYER_BYTES, MAX_LAYERS, MAX_PENDING, pending_layers, region_editor

    editor = region_editor(elem_id="bounded-editor", render=False)
    assert editor.get_config()["server_fns"] == ["accept_blobs"]  # the page still sends its layers ahead
    pending_layers(editor).clear()

    def send(payload_id: str, kind: str, index, data: bytes, to=editor) -> None:
        to.accept_blobs(
            AcceptBlobs(
                data={"type": kind, "index": index, "file": b"", "id": payload_id}, files=[("f.png", data)]
            )
        )

    send("page-1", "layer", "0", bomb)
    send("page-1", "background", None, bomb)  # never used: not kept
    send("page-1", "composite", None, bomb)
    send("page-1", "layer", str(10**9), bomb)  # Gradio's own would allocate a list of 10**9 entries
    send("page-1", "layer", str(MAX_LAYERS), bomb)
    send("page-1", "layer", "1", b"x" * (MAX_LAYER_BYTES + 1))
    value = editor.preprocess(EditorData(id="page-1"))
    assert value == {"background": None, "layers": [bomb], "composite": None}
    assert value["layers"][0] is bomb and decoded == []  # handed on as sent, nothing decoded
    assert pending_layers(editor) == {}  # taken by its event
    upload = FileData(path="/uploads/layer.png", orig_name="layer.png")
    assert editor.preprocess(EditorData(layers=[upload])) == {
        "background": None,
        "layers": ["/uploads/layer.png"],
        "composite": None,
    }
    for index in range(MAX_PENDING + 5):  # pages that never send their event: the oldest are dropped
        send(f"page-{index}", "layer", "0", b"png")
    assert list(pending_layers(editor)) == [f"page-{index}" for index in range(5, MAX_PENDING + 5)]


def test_a_region_editor_rebuilt_by_gradio_stays_one_and_other_editors_stay_gradios(need, bomb, decoded):
    """Gradio rebuilds a page's copy of a component from its constructor arguments when an event lists it
    as an output and leaves it as it is: the rebuilt editor must still keep layers undecoded and bounded,
    and find those sent to the one before it. (Methods set on the instance were lost that way: the page's
    editor then decoded every layer.) Any other ImageEditor keeps Gradio's own behaviour."""
    need("gradio")
    import gradio as gr
    from gradio.components.image_editor import AcceptBlobs, EditorData

    import mipadapter.web.editor as editor_module
    from mipadapter.web.editor import MAX_LAYERS, is_region_editor, pending_layers, region_editor

    editor = region_editor(elem_id="rebuilt-editor", elem_classes="region-editor", render=False)
    pending_layers(editor).clear()
    layer = {"type": "layer", "index": "0", "file": b"", "id": "before"}
    editor.accept_blobs(AcceptBlobs(data=layer, files=[("f.png", bomb)]))
    rebuilt = type(editor)(**{**editor.constructor_args, "render": False})
    assert rebuilt is not editor and "region-editor" in rebuilt.elem_classes
    assert rebuilt.preprocess(EditorData(id="before")) == {"background": None, "layers": [bomb], "composite": None}
    rebuilt.accept_blobs(AcceptBlobs(data={**layer, "index": str(MAX_LAYERS)}, files=[("f.png", bomb)]))
    assert pending_layers(rebuilt) == {} and decoded == []

    plain = gr.ImageEditor(elem_id="plain-editor", render=False)
    plain.accept_blobs(AcceptBlobs(data={**layer, "index": str(MAX_LAYERS)}, files=[("f.png", png_bomb(8, 8))]))
    assert len(plain.blob_storage["before"].layers) == MAX_LAYERS + 1  # Gradio's own: kept at any index
    assert not is_region_editor(plain) and "plain-editor" not in editor_module._pending  # nothing kept here


class Page:
    """The page's region events as Gradio's own processing runs them for one page (one session state):
    ``fields`` (names, box fields, width, height) and ``paint`` (one slot's editor, its layer sent ahead
    as the page does); each returns what it set, by elem_id (the region summary as ``summary``),
    leaving out what it left as it was."""

    def __init__(self, app):
        from gradio.state_holder import SessionState

        self.app, self.state, self.sent = app, SessionState(app), 0
        fns = [fn for fn in app.fns.values() if fn.name in ("on_fields_change", "on_painted_change")]
        self.fields_fn = next(fn for fn in fns if fn.name == "on_fields_change")
        self.paint_fns = {fn.inputs[-1].elem_id: fn for fn in fns if fn.name == "on_painted_change"}
        self.slots = len(self.paint_fns)

    def run(self, fn, inputs) -> dict:
        output = asyncio.run(self.app.process_api(fn, inputs, state=self.state, request=None))
        named = {}
        for block, value in zip(fn.outputs, output["data"], strict=True):
            if value != {"__type__": "update"} and block.elem_id is not None:
                named["summary" if block.elem_id == "region-summary" else block.elem_id] = value
        return named

    def fields(self, boxes: dict[int, tuple], names=("cat", "backpack"), size=(64, 64)) -> dict:
        """Two slots shown (the page's start; the count and panels' states are the session's own)."""
        inputs = [None, None, *size] + [None] * self.slots
        for index in range(self.slots):
            inputs += [names[index] if index < len(names) else "", *boxes.get(index, ("", "", "", ""))]
        return self.run(self.fields_fn, inputs)

    def paint(self, slot: int, layer: bytes, size=(64, 64)) -> dict:
        """A stroke on slot ``slot``'s editor: its layer (PNG) sent ahead under a new id, then the event."""
        from gradio.components.image_editor import AcceptBlobs

        fn = self.paint_fns[f"subject-{slot}-painted"]
        self.sent += 1
        data = {"type": "layer", "index": "0", "file": b"", "id": f"event-{self.sent}"}
        editor = self.state[fn.inputs[-1]._id]  # the session's own copy, as Gradio's route finds it
        editor.accept_blobs(AcceptBlobs(data=data, files=[("layer.png", layer)]))
        return self.run(fn, [None, None, *size, {"id": f"event-{self.sent}"}])


def test_a_removed_subjects_region_is_gone_when_its_slot_comes_back(need, pipe):
    """Removing the last subject empties its fields while its slot is hidden; adding a subject shows the
    slot again. What the preview keeps of it must be the emptied fields, not the box it had (the preview
    once kept only shown slots up to date, and drew the removed subject's box again)."""
    need("gradio")
    import mipadapter.web.app as web

    page = Page(web.build_app(pipe))
    by_name = {fn.name: fn for fn in page.app.fns.values()}
    assert page.fields({1: ("0", "0", "32", "32")})["summary"].endswith("'backpack': box (0, 0, 32, 32)")
    page.run(by_name["on_remove"], [None, 0.5])
    assert "**2**" not in page.fields({}, names=("cat", ""))["summary"]  # the emptied fields' events
    page.run(by_name["on_add"], [None])
    summary = page.run(by_name["on_slots_change"], [None, None, 64, 64])["summary"]
    assert summary == "**1** 'cat': anywhere its name is relevant (no region)"  # an empty slot has no line


def stroke_png(row: int, side: int = 64) -> bytes:
    """A horizontal stroke across a transparent ``side``² layer, 8 pixels thick around ``row``."""
    alpha = np.zeros((side, side), np.uint8)
    alpha[row - 4 : row + 4, 8 : side - 8] = 255
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([np.zeros((side, side, 3), np.uint8), alpha]), "RGBA").save(buffer, "PNG")
    return buffer.getvalue()


def test_the_preview_refuses_a_painted_bomb_through_gradios_own_processing(need, pipe, bomb, decoded):
    need("gradio")
    import mipadapter.web.app as web

    page = Page(web.build_app(pipe))
    page.fields({}, names=("cat",))
    tracemalloc.start()
    try:
        output = page.paint(0, bomb)  # a stroke on the editor, its layer a bomb
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert output["summary"].startswith(f"**1** 'cat': painted region not drawn ({BOMB_MESSAGE})")
    assert peak < 40 * 2**20, peak
    assert all(width * height <= Limits.max_painted_pixels for width, height in decoded), decoded


def test_the_preview_follows_what_changed_whatever_the_events_target_or_order(need, pipe):
    """The events of a page whose typed box never reached the preview (a browser test, on a loaded
    machine): Gradio re-runs an event that fired while the previous one ran with that one's target, and a
    stroke exported before it was cleared can arrive after the box that cleared it. What changed is told
    by comparing with what the page sent before, so the preview ends on what the page shows. (Deciding by
    the event's target, as before, ends this sequence with the old stroke back and the box emptied.)"""
    need("gradio")
    import mipadapter.web.app as web
    from mipadapter.web.handler import BOX_CLEARED, PAINT_CLEARED

    page = Page(web.build_app(pipe))
    fields = [f"subject-1-{field}" for field in ("x0", "y0", "x1", "y1")]
    assert page.fields({1: ("0", "0", "32", "32")})["summary"].endswith("'backpack': box (0, 0, 32, 32)")
    painted = page.paint(1, stroke_png(20))  # painting where a box is typed: the box makes way
    assert [painted.pop(field) for field in fields] == [""] * 4
    assert painted.pop("subject-1-region-note") == web.plain(BOX_CLEARED)
    assert "'backpack': painted region (" in painted["summary"]
    again = page.fields({})  # the box fields' own change events, as emptied: nothing more changes
    assert again.keys() == painted.keys() and again["summary"] == painted["summary"]

    typed = page.fields({1: ("8", "", "", "")})  # typing a box where a region is painted: the painting goes
    assert (typed.pop("subject-1-painted"), typed.pop("subject-1-region-note")) == (None, web.plain(PAINT_CLEARED))
    assert typed.keys() == {"region-preview", "summary"} and "painted region" not in typed["summary"]
    late = page.paint(1, stroke_png(20))  # the cleared stroke, exported before it was cleared, arrives late
    assert late.keys() == {"region-preview", "summary"} and "painted region" not in late["summary"]
    done = page.fields({1: ("8", "8", "40", "40")})
    assert done.keys() == {"region-preview", "summary"} and done["summary"].endswith("'backpack': box (8, 8, 40, 40)")

    repainted = page.paint(1, stroke_png(44))  # a new stroke is not the cleared one: the box makes way
    assert [repainted.pop(field) for field in fields] == [""] * 4 and "painted region (" in repainted["summary"]
    both = page.paint(0, stroke_png(30))["summary"]  # another slot's stroke leaves this one as it is
    assert "'cat': painted region (" in both and "'backpack': painted region (" in both


# --------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


SERVER_LIMITS = {"max_session_uploads": 3, "max_session_upload_bytes": 200_000}


@pytest.fixture(scope="module")
def served(need, pipe, tmp_path_factory):
    """The page served on a free loopback port, Gradio's uploads in a folder of the test's own; yields
    (url, app, upload folder)."""
    need("gradio")
    uploads = tmp_path_factory.mktemp("gradio-uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(uploads))
        import mipadapter.web.app as web

        limits = Limits.for_pipeline(pipe, **SERVER_LIMITS)
        app = web.build_app(pipe, limits)
        url = web.launch(app, port=free_port(), block=False, limits=limits)
        try:
            yield url, app, uploads
        finally:
            app.close()


def client(url: str, visit: bool = True):
    """An HTTP client; ``visit``: it loaded the page first (and so holds a session cookie)."""
    import httpx

    session = httpx.Client(base_url=url, timeout=30)
    if visit:
        assert session.get("/").status_code == 200
    return session


def png_bytes(seed: int, side: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def stored(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_a_page_visit_gets_a_private_session_cookie(served):
    url, _, _ = served
    response = client(url, visit=False).get("/")
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("mipadapter-session=") and cookie.endswith("; Path=/; HttpOnly; SameSite=Lax")
    again = client(url, visit=False)
    again.cookies.set("mipadapter-session", response.cookies["mipadapter-session"])
    assert "set-cookie" not in again.get("/").headers  # a session keeps its cookie


def test_a_foreign_host_is_refused_while_the_server_listens_on_loopback(served):
    url, _, _ = served
    port = url.rstrip("/").rsplit(":", 1)[1]
    page = client(url, visit=False)
    response = page.get("/", headers={"Host": f"rebound.example:{port}"})
    assert response.status_code == 403 and "set-cookie" not in response.headers
    assert response.text == (
        f"refused: Host 'rebound.example:{port}' is not a name of this server; it answers to localhost, "
        "127.0.0.1 and [::1] (mipadapter web --allow-host NAME adds a name, --host ADDRESS exposes it)"
    )
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert page.get("/", headers={"Host": host}).status_code == 200


def test_another_web_page_cannot_post_uploads(served):
    url, _, uploads = served
    page, before = client(url), stored(uploads)
    response = page.post(
        "/gradio_api/upload",
        files={"files": ("cat.png", png_bytes(1), "image/png")},
        headers={"Origin": "https://attacker.example"},
    )
    assert response.status_code == 403
    assert response.text == (
        "refused: a request from the page at 'https://attacker.example'; this server takes requests only "
        f"from its own page (http://{url.split('//')[1].rstrip('/')})"
    )
    assert stored(uploads) == before
    own = page.post(
        "/gradio_api/upload",
        files={"files": ("cat.png", png_bytes(1), "image/png")},
        headers={"Origin": url.rstrip("/")},
    )
    assert own.status_code == 200, own.text  # the page's own origin posts


def test_an_upload_needs_the_pages_session(served):
    url, _, uploads = served
    before = stored(uploads)
    response = client(url, visit=False).post(
        "/gradio_api/upload", files={"files": ("a.png", png_bytes(2), "image/png")}
    )
    assert (response.status_code, response.text) == (
        403,
        "upload refused: no session cookie (open the page first, then upload from it)",
    )
    assert stored(uploads) == before


def test_uploads_are_limited_per_session_in_count_and_bytes(served):
    url, _, uploads = served
    page = client(url)
    for index in range(3):
        response = page.post(
            "/gradio_api/upload", files={"files": (f"p{index}.png", png_bytes(10 + index), "image/png")}
        )
        assert response.status_code == 200, response.text
    before = stored(uploads)
    response = page.post("/gradio_api/upload", files={"files": ("p3.png", png_bytes(13), "image/png")})
    assert (response.status_code, response.text) == (
        413,
        "upload refused: this session has uploaded 3 files in the last hour; the limit is 3",
    )
    assert stored(uploads) == before
    other = client(url)  # another session has its own count
    assert (
        other.post("/gradio_api/upload", files={"files": ("q.png", png_bytes(20), "image/png")}).status_code
        == 200
    )
    many = client(url)  # four files in one request: none kept
    before = stored(uploads)
    files = [("files", (f"m{index}.png", png_bytes(30 + index), "image/png")) for index in range(4)]
    response = many.post("/gradio_api/upload", files=files)
    assert (response.status_code, response.text) == (
        413,
        "upload refused: 4 files would bring this session above its 3 files per hour",
    )
    assert stored(uploads) == before
    large = client(url)  # bytes: refused from the Content-Length, before the body is read
    big = png_bytes(40, side=300)
    assert len(big) > SERVER_LIMITS["max_session_upload_bytes"]
    response = large.post("/gradio_api/upload", files={"files": ("big.png", big, "image/png")})
    length = int(response.request.headers["content-length"])
    assert (response.status_code, response.text) == (
        413,
        f"upload refused: {length / 2**20:.1f} MB more would bring this session to {length / 2**20:.1f} MB "
        f"in the last hour; the limit is {SERVER_LIMITS['max_session_upload_bytes'] / 2**20:.1f} MB",
    )
    assert stored(uploads) == before


def test_an_uploaded_photo_is_served_only_to_the_session_that_uploaded_it(served):
    url, _, _ = served
    owner, stranger, anonymous = client(url), client(url), client(url, visit=False)
    photo = png_bytes(50)
    (path,) = owner.post("/gradio_api/upload", files={"files": ("mine.png", photo, "image/png")}).json()
    assert owner.get(f"/gradio_api/file={path}").content == photo
    for other in (stranger, anonymous):
        for route in (f"/gradio_api/file={path}", f"/gradio_api/file/{path}"):
            response = other.get(route)
            assert (response.status_code, response.json()) == (403, {"detail": f"File not allowed: {path}."})
    # what the server itself shows (an example photo) stays public
    import mipadapter.web.app as web

    example = web.EXAMPLES / "cat.jpg"
    assert stranger.get(f"/gradio_api/file={example}").content == example.read_bytes()


def test_the_preview_runs_in_the_queue_and_not_beside_it(served):
    url, app, _ = served
    by_name = {fn.name: fn for fn in app.fns.values()}
    previews = [fn for fn in by_name.values() if fn.concurrency_id == "preview"]
    preview = by_name["on_fields_change"]
    assert {fn.name for fn in previews} >= {"on_fields_change", "on_painted_change", "on_slots_change"}
    assert all(fn.queue and fn.concurrency_limit == 1 for fn in previews)
    inputs = [None, 2, 64, 64] + [True] * 4 + ["cat", None, None, None, None] * 4
    response = client(url).post(
        "/gradio_api/run/predict", json={"data": inputs, "fn_index": preview._id, "session_hash": "s"}
    )
    assert response.status_code == 404 and "join the queue" in response.json()["detail"]


def test_the_host_check_is_lifted_only_by_exposing_the_server():
    from mipadapter.web.guard import RequestGuard, is_loopback

    def scope(host: str | None, origin: str | None = None) -> dict:
        headers = [(b"host", host.encode())] if host else []
        return {"type": "http", "headers": headers + ([(b"origin", origin.encode())] if origin else [])}

    local, exposed = RequestGuard(None, limits=Limits()), RequestGuard(None, limits=Limits(), exposed=True)
    for host in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "127.0.0.2", None):
        assert local.refusal(scope(host)) is None, host
    for host in ("localhost.attacker.example:7860", "192.168.1.20:7860", "0.0.0.0:7860"):
        assert local.refusal(scope(host)).startswith(f"refused: Host {host!r} is not a name of this"), host
        assert exposed.refusal(scope(host)) is None
    proxied = RequestGuard(None, limits=Limits(), allowed_hosts=["Demo.Lab"])  # a proxy passing Host on
    assert proxied.refusal(scope("demo.lab", "https://demo.lab")) is None
    assert proxied.refusal(scope("other.lab")).startswith("refused: Host 'other.lab' is not a name of this")
    for origin in ("null", "http://attacker.example", "http://localhost:7861", "file://"):
        for guard in (local, exposed):
            assert guard.refusal(scope("localhost:7860", origin)).startswith(
                f"refused: a request from the page at {origin!r}"
            )
    assert local.refusal(scope("localhost:7860", "http://localhost:7860")) is None
    assert exposed.refusal(scope("demo.lab:7860", "https://demo.lab:7860")) is None
    assert [is_loopback(host) for host in ("localhost", "127.0.0.1", "::1", "0.0.0.0", "10.0.0.1")] == [
        True
    ] * 3 + [False] * 2


# ---------------------------------------------------------------------------------------- leftovers
def test_sigterm_removes_the_results_folder_as_ctrl_c_does(need, tmp_path):
    need("gradio")
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH", "")]
    )
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "mipadapter", "web", "--tiny", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while "serving http" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.25)
        (results,) = tmp_path.glob("mipadapter-web-*")  # the private folder of the PNGs the page writes
        assert results.is_dir()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(tmp_path.glob("mipadapter-web-*")) == [], log.read_text()


RSS_PROBE = """
import re, sys
from mipadapter.web.handler import painted_mask

def peak_mib():
    return int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

layer = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as reset:  # the peak so far (the imports') is forgotten
    reset.write("5")
before = peak_mib()
try:
    painted_mask({"layers": [layer]})
except ValueError as error:
    print(error)
print(peak_mib() - before)
"""


def test_the_painted_layer_bomb_costs_no_memory_to_refuse(bomb, tmp_path):
    """Peak resident memory of a fresh process refusing the bomb (Pillow's own buffers included, which
    tracemalloc does not see): decoding it would add 324 MB at least. Linux's /proc resets the peak."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    layer = tmp_path / "bomb.png"
    layer.write_bytes(bomb)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(layer)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    message, grown_mib = done.stdout.strip().splitlines()
    assert message == BOMB_MESSAGE
    assert int(grown_mib) < 32, grown_mib


def test_the_session_cookie_is_found_among_other_local_servers_cookies():
    from mipadapter.web.guard import session_of

    token = "A" * 16 + "b_-" + "9" * 13

    def scope(cookie: str) -> dict:
        return {"type": "http", "headers": [(b"cookie", cookie.encode())]}

    assert session_of(scope(f'jupyter="x;y"; bad\\cookie=1; mipadapter-session={token}; _xsrf=2|a')) == token
    assert session_of(scope("mipadapter-session=short")) is None  # not one this server gives
    assert session_of({"type": "http", "headers": []}) is None


def test_cli_session_upload_flags_reach_the_guard_and_are_checked_first(need, monkeypatch, capsys):
    need("gradio")
    import mipadapter.web.app as web
    from mipadapter.cli import options
    from mipadapter.cli.main import main

    launched = {}
    monkeypatch.setattr(web, "launch", lambda app, **kwargs: launched.update(kwargs))
    flags = ["--max-session-uploads", "7", "--max-session-upload-mb", "12", "--allow-host", "demo.lab"]
    assert main(["web", "--tiny", *flags, "--allow-host", "ai.lab"]) == 0
    limits = launched["limits"]
    assert (limits.max_session_uploads, limits.max_session_upload_bytes) == (7, 12 * 2**20)
    assert (launched["host"], launched["allowed_hosts"]) == ("127.0.0.1", ("demo.lab", "ai.lab"))

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded before the flags were checked")

    monkeypatch.setattr(options, "load_pipeline", no_models)
    capsys.readouterr()
    for flags, message in (
        (["--max-session-uploads", "0"], "--max-session-uploads must be ≥ 1, got 0"),
        (
            ["--max-session-upload-mb", "5"],
            "--max-session-upload-mb must be at least --max-upload-mb (10), got 5",
        ),
        (
            ["--max-session-upload-mb", "nan"],
            "--max-session-upload-mb must be at least --max-upload-mb (10), got nan",
        ),
        (
            ["--allow-host", "https://demo.lab"],
            "--allow-host takes a host name without scheme or port, got 'https://demo.lab'",
        ),
    ):
        assert main(["web", "--tiny", *flags]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"mipadapter web: error: {message}"]
