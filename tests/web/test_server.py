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

    from mipadapter.web.editor import MAX_LAYER_BYTES, MAX_LAYERS, MAX_PENDING, region_editor

    editor = region_editor(render=False)
    assert editor.get_config()["server_fns"] == ["accept_blobs"]  # the page still sends its layers ahead

    def send(payload_id: str, kind: str, index, data: bytes) -> None:
        editor.accept_blobs(
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
    assert editor.blob_storage == {}  # taken by its event
    upload = FileData(path="/uploads/layer.png", orig_name="layer.png")
    assert editor.preprocess(EditorData(layers=[upload])) == {
        "background": None,
        "layers": ["/uploads/layer.png"],
        "composite": None,
    }
    for index in range(MAX_PENDING + 5):  # pages that never send their event: the oldest are dropped
        send(f"page-{index}", "layer", "0", b"png")
    assert list(editor.blob_storage) == [f"page-{index}" for index in range(5, MAX_PENDING + 5)]


def test_the_preview_refuses_a_painted_bomb_through_gradios_own_processing(need, pipe, bomb, decoded):
    need("gradio")
    from gradio.components.image_editor import AcceptBlobs
    from gradio.events import EventData

    import mipadapter.web.app as web

    app = web.build_app(pipe)
    fn = next(fn for fn in app.fns.values() if fn.name == "on_region_change")
    # count, width, height, each slot's panel state, then (name, x0, y0, x1, y1, painted) per slot
    slots = (len(fn.inputs) - 3) // 7
    editor = fn.inputs[3 + slots + 5]
    editor.accept_blobs(
        AcceptBlobs(data={"type": "layer", "index": "0", "file": b"", "id": "p"}, files=[("l.png", bomb)])
    )
    inputs = [2, 64, 64] + [True] * slots + ["cat", None, None, None, None, {"id": "p"}]
    inputs += ["", None, None, None, None, None] * (slots - 1)
    tracemalloc.start()
    try:
        event = EventData(editor, {})  # the page sends its event's data: here a stroke on the editor
        output = asyncio.run(app.process_api(fn, inputs, request=None, event_data=event))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    summary = output["data"][1]
    assert summary == f"**1** 'cat': painted region not drawn ({BOMB_MESSAGE})"
    assert peak < 40 * 2**20, peak
    assert all(width * height <= Limits.max_painted_pixels for width, height in decoded), decoded


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
    preview = by_name["on_region_change"]
    assert preview.queue and preview.concurrency_limit == 1 and preview.concurrency_id == "preview"
    inputs = [2, 64, 64] + ["cat", None, None, None, None, None] * 4
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
