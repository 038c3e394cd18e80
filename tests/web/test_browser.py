"""`mipadapter web --tiny` driven by Debian's headless Chromium, as a person would use the page.

The server runs as a subprocess on a free loopback port; Chromium is Debian's (never a downloaded
build), driven through Playwright's Python client. Without them the tests skip and say why, except
under CI, where .ci/extra installs them and a missing piece fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def server(need, tmp_path_factory):
    """``mipadapter web --tiny`` on a free port: yields its URL, then stops it."""
    need("gradio", "playwright", "chromium")
    port = free_port()
    log_path = tmp_path_factory.mktemp("web") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mipadapter", "web", "--tiny", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`mipadapter web --tiny` did not start listening:\n{log_path.read_text()}")
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
def browser(server, chromium, tmp_path_factory):
    """A Chromium page context with a fresh user-data dir."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1100},
        )
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


def fill_subjects(page, prompt: str) -> None:
    """Upload a photo to each of the two subject slots, name them and write the prompt."""
    for slot, (name, photo) in enumerate(
        [("cat", ASSETS / "cat.jpg"), ("backpack", ASSETS / "backpack.jpg")]
    ):
        page.fill(f"#subject-{slot}-name textarea, #subject-{slot}-name input", name)
        page.set_input_files(f"#subject-{slot}-photos input[type=file]", str(photo))
        page.wait_for_function(  # the upload finished: the file is listed (its name split into spans)
            f"document.querySelector('#subject-{slot}-photos').innerText.includes('{photo.stem}')"
        )
    page.fill("#prompt textarea", prompt)
    page.fill("#steps input[type=number]", "2")
    page.press("#steps input[type=number]", "Enter")


def test_upload_two_subjects_generate_and_see_an_image_and_two_routing_maps(browser, server, tmp_path):
    page = browser.new_page()
    page.goto(server)
    fill_subjects(page, "a cat wearing a backpack in Boston")
    page.click("#generate")
    page.wait_for_function(
        "document.querySelectorAll('#maps img').length >= 2", timeout=60_000
    )  # the images gallery is filled in the same update
    assert page.locator("#images img").count() == 1
    assert page.locator("#maps img").count() == 2
    maps_text = page.inner_text("#maps")
    assert "cat" in maps_text and "backpack" in maps_text
    assert page.inner_text("#status").startswith("Generated 1 image of 64×64 in 2 steps")
    assert page.inner_text("#subject-0-error") == page.inner_text("#subject-1-error") == ""
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
    page.click("#example-1")  # dog + teapot, with boxes in pixels of the native size
    page.wait_for_function("document.querySelector('#subject-1-photos').innerText.includes('teapot')")
    assert page.input_value("#prompt textarea") == "a dog next to a teapot on a wooden table"
    assert page.input_value("#width input[type=number]") == "64"
    assert "dog" in page.inner_text("#subject-0-photos")
    page.fill("#steps input[type=number]", "2")
    page.press("#steps input[type=number]", "Enter")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#maps img').length >= 2", timeout=60_000)
    assert "'dog' (box), 'teapot' (box)" in page.inner_text("#status")
    page.close()
