"""`mipadapter web --tiny` driven by Debian's headless Chromium, as a person would use the page.

The server runs as a subprocess on a free loopback port; Chromium is Debian's (never a downloaded
build), driven through Playwright's Python client. Without them the tests skip and say why, except
under CI, where .ci/extra installs them and a missing piece fails.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mipadapter.recipe import read_recipe
from mipadapter.web.handler import BOX_CLEARED, PAINT_CLEARED, paint_stretched, slot_color
from mipadapter.web.preview import BACKGROUND, canvas_size

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 90
DESKTOP = {"width": 1400, "height": 1100}
PHONE = {"width": 390, "height": 844}


def save_screenshot(page, tmp_path, name: str) -> None:
    """A full-page screenshot under ``$MIPADAPTER_WEB_SCREENSHOTS`` (else the test's temporary folder), to
    look at the page's fixed states; never committed."""
    shots = Path(os.environ.get("MIPADAPTER_WEB_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / name), full_page=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def serve(command: list[str], port: int, log_path: Path):
    """Run ``command`` (a server on ``port``), yield its URL once it listens, then stop it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command[2:]} did not start listening:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert "serving http://127.0.0.1:" in log_path.read_text()  # bound to loopback, said so


@pytest.fixture(scope="module")
def server(need, tmp_path_factory):
    """``mipadapter web --tiny`` on a free port: yields its URL, then stops it."""
    need("gradio", "playwright", "chromium")
    port = free_port()
    command = [sys.executable, "-m", "mipadapter", "web", "--tiny", "--port", str(port)]
    yield from serve(command, port, tmp_path_factory.mktemp("web") / "server.log")


@pytest.fixture()
def fresh_server(need, tmp_path_factory):
    """A server of its own for a test that paints: strokes reach the server as uploads and preview
    events, and behind the earlier tests' queued work on the shared server their wait ran out; a
    painting's events still pending would also hold the shared server's preview queue for later tests."""
    need("gradio", "playwright", "chromium")
    port = free_port()
    command = [sys.executable, "-m", "mipadapter", "web", "--tiny", "--port", str(port)]
    yield from serve(command, port, tmp_path_factory.mktemp("web") / "fresh-server.log")


MIXED_SERVER = """
import dataclasses
import sys
from mipadapter.limits import Limits
from mipadapter.testing.mip import ARCHS, tiny_adapter, tiny_mip_pipeline
from mipadapter.web.app import build_app, launch

pipe = tiny_mip_pipeline("sdxl", "basic", text_weight=True)
face = tiny_adapter(pipe.pipe.unet, ARCHS["sdxl"][0].basic_image_encoder, "basic", False, 7)
face.config = dataclasses.replace(face.config, default_scale=0.55)  # as a preset's 0.6: not the default's
pipe.add_adapter("face", face)
limits = Limits.for_pipeline(pipe)
launch(build_app(pipe, limits), port=int(sys.argv[1]), limits=limits)
"""
"""The page around a tiny pipeline holding two adapters, ``default`` and ``face`` (the CLI's flags for
that are another module's)."""


@pytest.fixture(scope="module")
def mixed_server(need, tmp_path_factory):
    need("gradio", "playwright", "chromium")
    port = free_port()
    command = [sys.executable, "-c", MIXED_SERVER, str(port)]
    yield from serve(command, port, tmp_path_factory.mktemp("web") / "mixed-server.log")


@pytest.fixture(scope="module")
def browser(server, chromium, tmp_path_factory):
    """A Chromium page context with a fresh user-data dir."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=DESKTOP,
            accept_downloads=True,
        )
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


def thumbnails(page, slot: int):
    """The thumbnails shown in a subject's photo gallery."""
    return page.locator(f"#subject-{slot}-photos img")


def wait_for_thumbnails(page, slot: int, count: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('#subject-{slot}-photos img').length === {count}")


def set_number(page, selector: str, value) -> None:
    """Type into a number field and commit it (Enter), as a person does."""
    page.fill(f"{selector} input[type=number]", str(value))
    page.press(f"{selector} input[type=number]", "Enter")


def box_field(slot: int, field: str) -> str:
    """The text field of one box coordinate (``x0`` …) of a subject's region."""
    return f"#subject-{slot}-{field} textarea, #subject-{slot}-{field} input"


def type_box(page, slot: int, box) -> None:
    """Type a box into a subject's four fields, as a person does (the region panel is open)."""
    for field, value in zip(("x0", "y0", "x1", "y1"), box, strict=True):
        page.fill(box_field(slot, field), str(value))


def open_region(page, slot: int) -> None:
    page.click(f"#subject-{slot}-region button, #subject-{slot}-region .label-wrap")


def fill_subjects(page, prompt: str, steps: int = 2) -> None:
    """Upload a photo to each of the two subject slots, name them and write the prompt."""
    for slot, (name, photo) in enumerate(
        [("cat", ASSETS / "cat.jpg"), ("backpack", ASSETS / "backpack.jpg")]
    ):
        page.fill(f"#subject-{slot}-name textarea, #subject-{slot}-name input", name)
        page.set_input_files(f"#subject-{slot}-photos input[type=file]", str(photo))
        wait_for_thumbnails(page, slot, 1)  # the upload finished: its thumbnail is shown
    page.fill("#prompt textarea", prompt)
    set_number(page, "#steps", steps)


def wait_for_summary(page, text: str, timeout_s: float = 90) -> None:
    """Wait until the region summary shows ``text``: the preview queue is shared by the server's pages,
    so on a loaded machine it may come late; if it never comes, fail saying what the summary and the
    subjects' notes show instead (a lost event and a slow one then read differently)."""
    from playwright.sync_api import TimeoutError as PageTimeout

    try:
        page.locator("#region-summary").get_by_text(text).wait_for(timeout=timeout_s * 1000)
    except PageTimeout:
        notes = page.evaluate(
            "() => [...document.querySelectorAll('[id$=-region-note]')].map(e => e.id + ': ' + e.innerText)"
        )
        pytest.fail(
            f"the region summary never showed {text!r} in {timeout_s:g} s; it shows "
            f"{page.inner_text('#region-summary')!r}; notes {notes}"
        )


def wait_for_result(page, count: int = 2) -> None:
    """Wait until the routing maps are shown (the images gallery is filled in the same update)."""
    page.wait_for_function(f"document.querySelectorAll('#maps img').length >= {count}", timeout=60_000)


def fetch_image(page, selector: str) -> Image.Image:
    """The image an <img> on the page shows, fetched as the browser would."""
    response = page.request.get(page.get_attribute(selector, "src"))
    assert response.ok, response.status
    return Image.open(io.BytesIO(response.body())).convert("RGB")


def test_upload_two_subjects_generate_and_see_an_image_and_two_routing_maps(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston")
    page.click("#generate")
    wait_for_result(page)
    assert page.locator("#images img").count() == 1
    assert page.locator("#maps img").count() == 2
    maps_text = page.inner_text("#maps")
    assert "cat" in maps_text and "backpack" in maps_text
    assert page.inner_text("#status").startswith("Generated 1 image of 64×64 in 2 steps")
    assert page.inner_text("#subject-0-error") == page.inner_text("#subject-1-error") == ""
    assert page.locator("#subject-0-adapter").count() == 0  # one adapter: no choice shown
    shots = Path(os.environ.get("MIPADAPTER_WEB_SCREENSHOTS", tmp_path))  # to look at the page
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / "generated.png"), full_page=True)
    page.close()


def test_a_name_missing_from_the_prompt_is_shown_at_its_subject(browser, server):
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat on a beach")
    page.click("#generate")
    error = page.locator("#subject-1-error")
    error.get_by_text("does not occur in the prompt").wait_for()
    assert "subject 'backpack' does not occur in the prompt" in error.inner_text()
    assert page.inner_text("#subject-0-error") == ""
    assert "See the message at subject 2" in page.inner_text("#status")
    assert page.locator("#images img").count() == 0
    if "MIPADAPTER_WEB_SCREENSHOTS" in os.environ:
        page.screenshot(path=f"{os.environ['MIPADAPTER_WEB_SCREENSHOTS']}/missing-name.png", full_page=True)
    page.close()


def test_adding_subjects_stops_at_the_limit_with_a_message(browser, server):
    page = browser.new_page()
    page.goto(server)
    assert not page.locator("#subject-2-name").is_visible()
    page.click("#add-subject")
    page.locator("#subject-2-name").wait_for()
    page.click("#add-subject")
    page.locator("#subject-3-name").wait_for()
    page.click("#add-subject")  # a fifth: over the server's limit of 4
    page.locator("#slots-note").get_by_text("Too many subjects").wait_for()
    assert "at most 4" in page.inner_text("#slots-note")
    page.click("#remove-subject")
    page.locator("#subject-3-name").wait_for(state="hidden")
    assert page.inner_text("#slots-note") == ""
    page.close()


def test_an_example_button_loads_two_photos_and_a_prompt_that_generate(browser, server):
    page = browser.new_page()
    page.goto(server)
    page.fill("#width input[type=number]", "96")
    page.press("#width input[type=number]", "Enter")
    # the resize handled (the preview drawn 3:2) before the example: a new canvas set then on the folded
    # region editors left the page unable to send them, and Generate never reached the server
    page.wait_for_function(
        "(i => i && i.complete && Math.abs(i.naturalWidth / i.naturalHeight - 1.5) < 0.05)"
        "(document.querySelector('#region-preview img'))"
    )
    page.click("#example-1")  # dog + teapot, with boxes in pixels of the native size
    wait_for_thumbnails(page, 1, 1)
    assert page.input_value("#prompt textarea") == "a dog next to a teapot on a wooden table"
    assert page.input_value("#width input[type=number]") == "64"
    assert thumbnails(page, 0).get_attribute("src").endswith("/dog.jpg")  # shown as a picture
    assert thumbnails(page, 1).get_attribute("src").endswith("/teapot.jpg")
    assert page.locator(box_field(0, "x1")).is_visible()  # the example's boxes are shown, not folded
    assert page.input_value(box_field(0, "x1")) == "32"
    set_number(page, "#steps", 2)
    page.click("#generate")
    wait_for_result(page)
    assert "'dog' (box), 'teapot' (box)" in page.inner_text("#status")
    page.close()


def test_photos_show_as_thumbnails_and_are_removed_one_by_one(browser, server):
    page = browser.new_page()
    page.goto(server)
    photos = [str(ASSETS / "cat.jpg"), str(ASSETS / "backpack.jpg")]
    page.set_input_files("#subject-0-photos input[type=file]", photos)
    wait_for_thumbnails(page, 0, 2)
    sources = [thumbnails(page, 0).nth(index).get_attribute("src") for index in range(2)]
    assert sources[0].endswith("/cat.jpg") and sources[1].endswith("/backpack.jpg")
    for viewport in (PHONE, DESKTOP):  # each photo's × lies inside the gallery and the window
        page.set_viewport_size(viewport)
        page.locator("#subject-0-photos").scroll_into_view_if_needed()
        gallery = page.locator("#subject-0-photos").bounding_box()
        for button in page.locator("#subject-0-photos button[aria-label='Delete image']").all():
            box = button.bounding_box()
            assert gallery["y"] <= box["y"] and box["y"] + box["height"] <= gallery["y"] + gallery["height"]
            assert gallery["x"] <= box["x"] and box["x"] + box["width"] <= gallery["x"] + gallery["width"]
            assert 0 <= box["x"] and box["x"] + box["width"] <= viewport["width"]
    page.locator("#subject-0-photos button[aria-label='Delete image']").first.click()
    wait_for_thumbnails(page, 0, 1)
    assert thumbnails(page, 0).get_attribute("src").endswith("/backpack.jpg")
    page.fill("#subject-0-name textarea, #subject-0-name input", "backpack")
    page.fill("#prompt textarea", "a backpack on a beach")
    set_number(page, "#steps", 1)
    page.click("#generate")
    wait_for_result(page, 1)  # the request carried the one photo left
    assert page.inner_text("#status").startswith("Generated 1 image")
    page.close()


def test_a_box_typed_as_numbers_is_drawn_over_the_canvas_preview(browser, server):
    page = browser.new_page()
    page.goto(server)
    page.fill("#subject-1-name textarea, #subject-1-name input", "teapot")
    open_region(page, 1)
    type_box(page, 1, (32, 0, 64, 32))
    wait_for_summary(page, "box (32, 0, 64, 32)")
    assert "'teapot'" in page.inner_text("#region-summary")
    preview = np.asarray(fetch_image(page, "#region-preview img")).astype(int)
    width, height = canvas_size(64, 64)
    assert preview.shape == (height, width, 3)
    color, scale = np.array(slot_color(1)), width / 64
    top, right = 1, round(64 * scale) - 2  # on the box's outline (top edge, right edge)
    assert np.array_equal(preview[top, (32 * round(scale) + right) // 2], color)
    assert np.array_equal(preview[round(16 * scale), right], color)
    inside = preview[round(24 * scale), round(56 * scale)]  # tinted towards the subject's colour
    assert np.abs(inside - color).sum() < np.abs(np.array(BACKGROUND) - color).sum()
    assert np.array_equal(preview[round(48 * scale), round(16 * scale)], BACKGROUND)  # outside: blank
    page.close()


def test_a_downloaded_image_carries_its_recipe_naming_both_subjects(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    page.click("#example-1")
    wait_for_thumbnails(page, 1, 1)
    set_number(page, "#steps", 2)
    set_number(page, "#seed", 7)
    page.click("#generate")
    wait_for_result(page)
    page.locator("#images img").first.click()  # open the image, then its download button
    with page.expect_download() as download:
        page.locator("#images button[aria-label='Download']").click()
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.suffix == ".png"
    recipe = read_recipe(saved)
    assert [subject["name"] for subject in recipe["subjects"]] == ["dog", "teapot"]
    assert [subject["region"] for subject in recipe["subjects"]] == [[0, 0, 32, 64], [32, 0, 64, 64]]
    assert recipe["prompt"] == "a dog next to a teapot on a wooden table"
    assert (recipe["seed"], recipe["steps"]) == (7, 2)
    assert recipe["models"]["tiny"] == "sdxl"
    with Image.open(saved) as image:
        assert image.size == (recipe["width"], recipe["height"]) == (64, 64)
    page.close()


def test_a_starved_subject_shows_its_warning_at_its_own_slot(browser, server):
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston")
    open_region(page, 1)
    type_box(page, 1, (0, 0, 8, 8))  # one latent cell
    wait_for_summary(page, "box (0, 0, 8, 8)")
    page.click("#generate")
    warning = page.locator("#subject-1-warning")
    warning.get_by_text("Warning").wait_for(timeout=60_000)
    assert "backpack" in warning.inner_text()
    assert page.inner_text("#subject-0-warning") == ""
    assert page.inner_text("#subject-0-error") == page.inner_text("#subject-1-error") == ""
    assert page.locator("#images img").count() == 1  # a warning, not a refusal
    assert "See the warning at subject 2" in page.inner_text("#status")
    page.close()


WATCH_JS = """([selector, needle]) => {
    const seen = (window.__seen = window.__seen || {});
    const look = () => {
        const target = document.querySelector(selector);
        if (target && target.innerText.includes(needle)) seen[selector + needle] = true;
    };
    new MutationObserver(look).observe(document.body, {subtree: true, childList: true, characterData: true});
    look();
}"""


def watch(page, selector: str, needle: str) -> None:
    """Remember, from now on, whether ``needle`` ever shows in ``selector`` (``seen``), however briefly."""
    page.evaluate(WATCH_JS, [selector, needle])


def seen(page, selector: str, needle: str) -> bool:
    return page.evaluate("(key) => Boolean((window.__seen || {})[key])", selector + needle)


SET_AND_CLICK_JS = """async ([values, button]) => {
    const setter = Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, "value").set;
    for (const [selector, value] of Object.entries(values)) {
        const input = document.querySelector(selector);
        setter.call(input, String(value));
        input.dispatchEvent(new Event("input", {bubbles: true}));
        input.dispatchEvent(new Event("change", {bubbles: true}));
    }
    await new Promise(requestAnimationFrame);  // the page's framework applies the values
    document.querySelector(button).click();
}"""


def wait_while_steps_count(page, done_js: str, what: str, stall_s: float = 60, start_s: float = 180) -> None:
    """Wait until ``done_js`` holds, as long as the generations keep counting steps (Gradio's progress in
    ``#status``) or adding results: a loaded machine makes them slower, not wrong, so there is no fixed
    deadline; fail, naming ``what`` and what the page shows, once nothing moved for ``stall_s`` seconds
    (``start_s`` before the first step is counted: the first call warms the model up)."""
    moved, last = time.monotonic(), None
    while not page.evaluate(done_js):
        steps = re.findall(r"\d+/\d+ steps", page.inner_text("#status"))
        now = (steps[-1] if steps else None, page.locator("#history img").count())
        if now != last:
            moved, last = time.monotonic(), now
        elif time.monotonic() - moved > (stall_s if now != (None, 0) else start_s):
            state = [page.inner_text(selector) for selector in ("#status", "#queue-note", "#history")]
            pytest.fail(f"{what}: nothing moved for {stall_s:g} s; the page shows {state}")
        page.wait_for_timeout(250)


def test_two_quick_clicks_give_two_results_in_order(browser, server):
    """A long first generation, then a short second one clicked while it runs: the second waits its turn
    (the page says so) and both results arrive in click order, the long one first.

    Once flaky under heavy CPU load: its waits had fixed deadlines (30 s for the first step, 90 s for
    both results) that a slowed-down run passed; they now wait as long as steps are being counted."""
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston", steps=100)
    watch(page, "#queue-note", "1 waiting")
    page.click("#generate")
    running = "document.querySelector('#status').innerText.includes('/100 steps')"  # Gradio's progress
    wait_while_steps_count(page, running, "the first generation did not start")
    second = {"#seed input[type=number]": 421, "#steps input[type=number]": 2}
    page.evaluate(SET_AND_CLICK_JS, [second, "#generate"])  # at once, while the first runs
    two = "document.querySelectorAll('#history img').length === 2"
    wait_while_steps_count(page, two, "two results did not arrive")
    captions = page.locator("#history .caption-label").all_inner_texts()
    assert captions == ["#2 · seed 421", "#1 · seed 420"]  # newest first: the short one came second
    assert page.inner_text("#status").startswith("Generated 1 image of 64×64 in 2 steps (seed 421,")
    assert seen(page, "#queue-note", "1 waiting")  # the second click's place in the queue was shown
    assert page.inner_text("#queue-note") == ""
    page.close()


def test_a_painted_region_reaches_the_preview_and_photos_stay_with_their_page(browser, fresh_server):
    import urllib.error
    import urllib.request

    page = browser.new_page()
    page.goto(fresh_server)
    page.fill("#subject-0-name textarea, #subject-0-name input", "cat")
    page.set_input_files("#subject-0-photos input[type=file]", str(ASSETS / "cat.jpg"))
    wait_for_thumbnails(page, 0, 1)
    thumbnail = page.get_attribute("#subject-0-photos img", "src")
    assert page.request.get(thumbnail).ok  # this browser uploaded it
    with pytest.raises(urllib.error.HTTPError) as refused:  # any other client: refused
        urllib.request.urlopen(urllib.parse.urljoin(fresh_server, thumbnail), timeout=10)
    assert refused.value.code == 403
    open_region(page, 0)
    type_box(page, 0, (0, 0, 32, 32))
    wait_for_summary(page, "box (0, 0, 32, 32)")
    paint_stroke(page, 0)  # painting where a box is typed: the box makes way, with a note
    page.locator("#region-summary").get_by_text("painted region (").wait_for(timeout=90_000)
    assert "'cat': painted region (" in page.inner_text("#region-summary")
    page.locator("#subject-0-region-note").get_by_text(BOX_CLEARED, exact=True).wait_for()  # as written
    assert [page.input_value(box_field(0, field)) for field in ("x0", "y0", "x1", "y1")] == [""] * 4
    page.fill(box_field(0, "x0"), "8")  # typing a box where a region is painted: the painting makes way
    page.locator("#subject-0-region-note").get_by_text(PAINT_CLEARED, exact=True).wait_for()
    type_box(page, 0, (8, 8, 40, 40))
    wait_for_summary(page, "box (8, 8, 40, 40)")
    # a preview event queued with the editor's older value can redraw the summary once more: wait for the
    # summary the fields settle on
    page.wait_for_function(
        "() => !document.querySelector('#region-summary').innerText.includes('painted region')", timeout=30_000
    )
    assert "box (8, 8, 40, 40)" in page.inner_text("#region-summary")
    page.fill("#prompt textarea", "a cat on a beach")
    set_number(page, "#steps", 1)
    page.click("#generate")
    wait_for_result(page, 1)  # no "give a box or a painted region, not both"
    assert "'cat' (box)" in page.inner_text("#status")
    page.close()


def paint_stroke(page, slot: int) -> None:
    """A short horizontal brush stroke across the middle of a subject's canvas (its panel open)."""
    brush = page.locator(f"#subject-{slot}-painted button[aria-label='Brush']")
    if "highlight" not in (brush.get_attribute("class") or ""):  # a second click would open its options
        brush.click()
    canvas = page.locator(f"#subject-{slot}-painted canvas").first
    canvas.scroll_into_view_if_needed()  # the mouse paints only inside the window
    box = canvas.bounding_box()  # the drawing area sits in the middle of the editor
    y = box["y"] + box["height"] * 0.5
    page.mouse.move(box["x"] + box["width"] * 0.4, y)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.4 + 0.02 * step), y)
    page.mouse.up()


def test_opening_and_closing_a_region_panel_leaves_no_box(browser, server):
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston", steps=1)
    open_region(page, 0)
    page.locator(box_field(0, "x0")).wait_for()
    assert [page.input_value(box_field(0, field)) for field in ("x0", "y0", "x1", "y1")] == [""] * 4
    open_region(page, 0)  # closed again
    page.click("#generate")
    wait_for_result(page)
    assert page.inner_text("#status").startswith("Generated 1 image")
    assert "(box)" not in page.inner_text("#status")
    assert page.inner_text("#subject-0-error") == ""
    page.close()


def wait_for_status(page, needle: str) -> str:
    try:
        page.locator("#status").get_by_text(needle).wait_for(timeout=60_000)
    except Exception:
        pytest.fail(f"the status did not say {needle!r}: {page.inner_text('#status')!r}")
    return page.inner_text("#status")


def test_numbers_out_of_range_are_refused_before_the_model_runs_with_the_clis_words(browser, server):
    page = browser.new_page()
    server_errors = []
    page.on("response", lambda response: response.status >= 500 and server_errors.append(response.url))
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston", steps=1)
    top = 2**64 - 1
    for typed, shown in ((-5, "-5"), ("99999999999999999999", "100000000000000000000")):
        set_number(page, "#seed", typed)
        page.click("#generate")
        status = wait_for_status(page, f"got {shown}")
        assert status == f"Not generated. The seed must be an integer between 0 and {top}, got {shown}."
    set_number(page, "#seed", 3)
    set_number(page, "#width", 5000)  # past the slider's end: the field shows the size that runs
    message = "The width must be a multiple of 16 between 32 and 96 pixels, got 5000: set to 96."
    page.locator("#numbers-note").get_by_text(message).wait_for()
    assert page.input_value("#width input[type=number]") == "96"
    page.click("#generate")
    wait_for_status(page, "Generated 1 image of 96×64 in 1 step (seed 3,")
    assert server_errors == []  # the preview's refresh too
    page.fill("#subject-0-name textarea, #subject-0-name input", "**cat**")  # Markdown's bold, as text
    page.click("#generate")
    page.locator("#subject-0-error").get_by_text("'**cat**'").wait_for()
    page.close()


def test_results_are_shown_whole_at_their_aspect_ratio(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    page.click("#example-0")  # cat + backpack, no boxes
    wait_for_thumbnails(page, 1, 1)
    set_number(page, "#width", 96)
    set_number(page, "#height", 32)
    set_number(page, "#steps", 1)
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#history img').length === 1", timeout=60_000)
    assert page.inner_text("#status").startswith("Generated 1 image of 96×32")
    for selector in ("#images img", "#maps img", "#history img"):  # each shown item is the whole 3:1 image
        for image in page.locator(selector).all():
            image.scroll_into_view_if_needed()
            box = image.bounding_box()
            assert abs(box["width"] / box["height"] - 3) < 0.05, (selector, box)
            assert image.evaluate("i => getComputedStyle(i).objectFit") == "contain"
    save_screenshot(page, tmp_path, "desktop-96x32.png")
    page.close()


def test_a_photo_over_the_limit_is_named_with_the_limit_at_its_subject(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    big = tmp_path / "big.jpg"
    big.write_bytes((ASSETS / "cat.jpg").read_bytes() + bytes(11 * 2**20))  # 11 MB; the limit is 10 MB
    page.set_input_files("#subject-0-photos input[type=file]", str(big))
    error = page.locator("#subject-0-error")
    error.get_by_text("big.jpg is").wait_for(timeout=60_000)
    size = f"{big.stat().st_size / 2**20:.1f} MB"
    assert error.inner_text() == f"⚠ Photo of subject 1: big.jpg is {size}; the limit is 10.0 MB."
    assert page.locator(".toast-body").count() == 0  # no bare "Error" pop-up
    page.close()


def test_the_phone_layout_keeps_labels_clear_and_captions_whole(browser, server, tmp_path):
    page = browser.new_page()
    page.set_viewport_size(PHONE)
    page.goto(server)
    open_region(page, 0)
    label = page.locator("#subject-0-painted label[data-testid='block-label']")
    label.wait_for()
    assert "Painted region" in label.inner_text()
    first = label.bounding_box()
    tools = page.locator("#subject-0-painted button.icon-button").all()
    assert tools  # pan, zoom, undo, redo, clear
    for tool in tools:
        other = tool.bounding_box()
        apart = (
            first["x"] + first["width"] <= other["x"]
            or other["x"] + other["width"] <= first["x"]
            or first["y"] + first["height"] <= other["y"]
            or other["y"] + other["height"] <= first["y"]
        )
        assert apart, (tool.get_attribute("aria-label"), first, other)
    page.click("#example-0")
    wait_for_thumbnails(page, 1, 1)
    set_number(page, "#steps", 1)
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#history img').length === 1", timeout=60_000)
    widths = page.evaluate(
        "() => [...document.querySelectorAll('#history .caption-label')].map(c => [c.scrollWidth, c.clientWidth])"
    )
    assert widths and all(scroll <= client for scroll, client in widths), widths
    save_screenshot(page, tmp_path, "phone.png")
    page.close()


def paint_canvas_on_screen(page, slot: int) -> tuple[np.ndarray, np.ndarray]:
    """Where a subject's paint canvas shows on screen, from a screenshot of its editor: the canvas as a
    [H, W] boolean picture (its blank grey, ``BACKGROUND``, or paint) cropped to the rows and columns it
    fills (the label's and buttons' grey borders fill few), and the paint in it (the slot's colour;
    the tool bar over the canvas, whose colour button shows it too, left out)."""
    canvas = page.locator(f"#subject-{slot}-painted canvas").first
    origin = canvas.bounding_box()
    pixels = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)
    grey = np.abs(pixels - np.array(BACKGROUND)).max(axis=-1) <= 3
    paint = np.abs(pixels - np.array(slot_color(slot))).max(axis=-1) <= 12
    for tool in ("Brush", "Erase", "Color", "Brush Size"):
        button = page.locator(f"#subject-{slot}-painted button[aria-label='{tool}']")
        if button.count():
            box = button.first.bounding_box()
            left, top = int(box["x"] - origin["x"]) - 8, int(box["y"] - origin["y"]) - 8
            paint[max(0, top) : top + int(box["height"]) + 16, max(0, left) : left + int(box["width"]) + 16] = False
    shown = grey | paint
    rows = np.nonzero(shown.mean(axis=1) > 0.3)[0]
    columns = np.nonzero(shown.mean(axis=0) > 0.3)[0]
    if rows.size == 0 or columns.size == 0:
        return shown[:0, :0], paint[:0, :0]
    crop = np.s_[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    return shown[crop], paint[crop]


def wait_for_canvas_ratio(page, slot: int, ratio: float, timeout_s: float = 30) -> tuple[np.ndarray, np.ndarray]:
    """The canvas (as ``paint_canvas_on_screen``) once its width / height is ``ratio`` (within 4 %)."""
    deadline = time.monotonic() + timeout_s
    while True:
        canvas, paint = paint_canvas_on_screen(page, slot)
        shown = canvas.shape[1] / canvas.shape[0] if canvas.size else 0.0
        if abs(shown / ratio - 1) < 0.04:
            return canvas, paint
        if time.monotonic() > deadline:
            pytest.fail(f"the paint canvas shows {canvas.shape[1]}×{canvas.shape[0]}, not {ratio:g}:1")
        page.wait_for_timeout(250)


def extent(paint: np.ndarray) -> tuple[float, float, float, float]:
    """The painted part of a canvas picture: (left, top, right, bottom) as fractions of its sides."""
    rows, columns = np.nonzero(paint)
    height, width = paint.shape
    return columns.min() / width, rows.min() / height, (columns.max() + 1) / width, (rows.max() + 1) / height


def test_the_paint_canvas_takes_the_outputs_shape_and_a_painting_is_stretched_with_it(browser, fresh_server, tmp_path):
    """96×32: the canvas shows 3:1 (it was square); painted, then the height set to 64: the canvas shows
    3:2, the painting is kept, stretched to the same part of the canvas, the note says so, and it runs."""
    page = browser.new_page()
    page.goto(fresh_server)
    page.fill("#subject-0-name textarea, #subject-0-name input", "cat")
    page.set_input_files("#subject-0-photos input[type=file]", str(ASSETS / "cat.jpg"))
    wait_for_thumbnails(page, 0, 1)
    set_number(page, "#width", 96)
    set_number(page, "#height", 32)  # the region panel still closed: its canvas follows when opened
    open_region(page, 0)
    page.locator("#subject-0-painted canvas").first.wait_for()
    wait_for_canvas_ratio(page, 0, 3)
    paint_stroke(page, 0)
    page.locator("#region-summary").get_by_text("painted region (").wait_for(timeout=90_000)
    _, paint = wait_for_canvas_ratio(page, 0, 3)
    before = extent(paint)
    save_screenshot(page, tmp_path, "paint-canvas-96x32.png")
    set_number(page, "#height", 64)
    page.locator("#subject-0-region-note").get_by_text(paint_stretched(96, 64), exact=True).wait_for(timeout=90_000)
    _, paint = wait_for_canvas_ratio(page, 0, 1.5)
    after = extent(paint)
    assert np.allclose(before, after, atol=0.03), (before, after)  # the same part of the canvas
    assert "'cat': painted region (" in page.inner_text("#region-summary")
    save_screenshot(page, tmp_path, "paint-canvas-96x64.png")
    page.fill("#prompt textarea", "a cat on a beach")
    set_number(page, "#steps", 1)
    page.click("#generate")
    wait_for_status(page, "Generated 1 image of 96×64")
    assert "'cat' (painted region)" in page.inner_text("#status")
    page.close()


def test_with_two_adapters_each_subject_picks_one_and_the_status_names_it(browser, mixed_server, tmp_path):
    page = browser.new_page()
    page.goto(mixed_server)
    choice = page.locator("#subject-0-adapter input")
    assert choice.input_value() == "default"  # preselected
    fill_subjects(page, "a cat wearing a backpack in Boston")
    choice.click()
    page.locator("ul[role='listbox'] li", has_text="face").first.click()
    page.wait_for_function("document.querySelector('#subject-0-adapter input').value === 'face'")
    # its strength is the face adapter's default; the rule left to the call runs paper (face has no text
    # weight) rather than refusing the default adapter's official
    page.wait_for_function("document.querySelector('#subject-0-strength input[type=number]').value === '0.55'")
    assert page.locator("#rule input").input_value().startswith("by the adapters")
    page.click("#generate")
    status = wait_for_status(page, "Generated 1 image")
    assert "rule paper" in status and "'cat' (adapter face), 'backpack' (adapter default)" in status
    save_screenshot(page, tmp_path, "two-adapters.png")
    page.close()
