"""The field-testing page in a real browser: Debian's chromium driven by Playwright, against the
real server (HTTP API on a free port, on the same event loop as the test). Screenshots at phone
and desktop size go to build/ (`build/page-phone-*.png`, `build/page-desktop.png`)."""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from matcher.v1 import matcher_pb2
from service.server import RunningServer
from tests.conftest import outside_queries, query_images
from tests.test_http_api import serving

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
#: A common small phone (CSS pixels), and a laptop.
PHONE = {"width": 360, "height": 780}
DESKTOP = {"width": 1280, "height": 900}
BLOB_URL = re.compile(r"^blob:http://localhost:\d+/")
CORRUPT = b"\xff\xd8\xff\xe0 this was a JPEG once" + bytes(range(256))


def chromium_path() -> str:
    """Debian's chromium (make test installs it); a missing one fails, never skips."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not found:
        pytest.fail("no chromium: `apt-get install chromium` (make test does it as root)")
    return found


@pytest.fixture(scope="module")
async def page_server(settings, tmp_path_factory) -> AsyncIterator[RunningServer]:
    """The server with feedback on, so that the page's whole flow can be walked."""
    feedback = tmp_path_factory.mktemp("page-feedback")
    async with serving(settings.model_copy(update={"feedback_dir": feedback})) as running:
        yield running


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # No sandbox: CI runs as root in a container, where chromium's sandbox cannot start.
        launched = await playwright.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox"]
        )
        yield launched
        await launched.close()


@pytest.fixture
async def phone(browser, page_server) -> AsyncIterator[Page]:
    context = await browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = await context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    await page.goto(f"http://localhost:{page_server.http_port}/")
    await expect(page.locator("#model")).to_contain_text("items")
    page.problems = problems  # type: ignore[attr-defined]
    yield page
    await context.close()


def outside_no_match(answers: dict[Path, matcher_pb2.MatchResponse]) -> Path:
    refused = [path for path, answer in answers.items() if answer.verdict == matcher_pb2.NO_MATCH]
    assert refused, "no outside photo is answered NO_MATCH (tests/test_no_match.py says why)"
    return refused[0]


async def test_a_demo_query_shows_its_label_first_with_a_reference_image(phone, demo):
    label, path = query_images(demo)[0]
    await phone.set_input_files("#file-input", str(path))
    await expect(phone.locator("#verdict")).to_have_text(label)
    await expect(phone.locator("#verdict")).to_have_class("verdict match")
    first = phone.locator("#matches li").first
    await expect(first.locator(".label")).to_have_text(label)
    await expect(phone.locator("#matches li")).to_have_count(5)
    reference = first.locator("img.reference")
    await expect(reference).to_have_attribute("src", BLOB_URL)
    await phone.wait_for_function(
        "() => document.querySelector('#matches li img.reference').naturalWidth > 0"
    )
    await expect(phone.locator("#elapsed")).to_contain_text(" ms")
    # Readable at 360 px: nothing wider than the screen.
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]
    BUILD.mkdir(exist_ok=True)
    await phone.screenshot(path=BUILD / "page-phone-match.png", full_page=True)
    assert phone.problems == []


async def test_a_photo_dropped_on_the_page_is_matched(phone, demo):
    label, path = query_images(demo)[3]
    encoded = base64.b64encode(path.read_bytes()).decode()
    transfer = await phone.evaluate_handle(
        """(encoded) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], "dropped.jpg", { type: "image/jpeg" }));
            return data;
        }""",
        encoded,
    )
    await phone.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    await expect(phone.locator("#verdict")).to_have_text(label)


async def test_a_corrupt_file_shows_the_servers_message(phone, stub):
    await phone.set_input_files(
        "#file-input", files=[{"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": CORRUPT}]
    )
    error = phone.locator("#error")
    await expect(error).to_be_visible()
    with pytest.raises(Exception) as refused:
        await stub.Match(matcher_pb2.ImageRequest(image=CORRUPT))
    await expect(error).to_have_text(refused.value.details())
    await expect(phone.locator("#result")).to_be_hidden()
    await phone.screenshot(path=BUILD / "page-phone-error.png", full_page=True)


async def test_an_out_of_catalogue_photo_shows_no_match(phone, stub, demo):
    answers = {
        path: await stub.Match(matcher_pb2.ImageRequest(image=path.read_bytes()))
        for path in outside_queries(demo)
    }
    path = outside_no_match(answers)
    await phone.set_input_files("#file-input", str(path))
    await expect(phone.locator("#verdict")).to_have_text("No match")
    await expect(phone.locator("#verdict")).to_have_class("verdict no-match")
    await expect(phone.locator("#verdict-detail")).to_contain_text("Nothing in the catalogue")
    await expect(phone.locator("#confirm")).to_be_hidden()  # nothing to confirm
    await phone.screenshot(path=BUILD / "page-phone-no-match.png", full_page=True)


async def test_confirming_saves_the_photo_as_a_view_of_that_item(phone, page_server, demo):
    label, path = query_images(demo)[1]
    await phone.set_input_files("#file-input", str(path))
    await expect(phone.locator("#confirm-label")).to_have_text(label)
    await phone.click("#confirm")
    await expect(phone.locator("#feedback-status")).to_contain_text(f"Saved as a view of {label}")
    saved = list((_feedback_dir(page_server) / label).iterdir())
    assert [p.read_bytes() for p in saved] == [path.read_bytes()]
    # Correcting: another label chosen from the list.
    other = next(name for name, _ in query_images(demo) if name != label)
    await phone.select_option("#correct-label", other)
    await phone.click("#correct")
    await expect(phone.locator("#feedback-status")).to_contain_text(f"Saved as a view of {other}")
    assert len(list((_feedback_dir(page_server) / other).iterdir())) == 1


async def test_the_desktop_layout(browser, page_server, demo):
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    await page.goto(f"http://localhost:{page_server.http_port}/")
    label, path = query_images(demo)[2]
    await page.set_input_files("#file-input", str(path))
    await expect(page.locator("#matches li .label").first).to_have_text(label)
    await page.wait_for_function(
        "() => [...document.querySelectorAll('#matches img.reference')]"
        ".every((img) => img.naturalWidth > 0)"
    )
    BUILD.mkdir(exist_ok=True)
    await page.screenshot(path=BUILD / "page-desktop.png", full_page=True)
    await context.close()


def _feedback_dir(running: RunningServer) -> Path:
    folder = running.http_endpoint.api.feedback_dir
    assert folder is not None
    return folder
