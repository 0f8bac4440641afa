"""The front end in a real browser: headless Chromium (Debian's ``chromium`` package) driven by Playwright.

Opens the page, asks the Text2Music tab for a 3 s song with the form's own controls, clicks
Generate and waits for the audio player; then downloads the file the player links to and checks
it is the 3 s, 48 kHz stereo song that was asked for. A second test closes the page while a
200-step request runs and checks, in the server's metrics, that the request was cancelled
there rather than run to completion. Uses the system Chromium through
``executable_path`` (no Playwright browser download); skipped, saying why, where Playwright or
Chromium is missing (install: ``apt-get install -y chromium``, ``pip install playwright==1.65.2``).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import soundfile as sf

pytest.importorskip("gradio_client", reason="the ui extra (gradio, gradio_client) is not installed")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
from test_frontend import FRAME_S, RATE, requests_finished, running_frontend, wait_for_cancelled_request  # noqa: E402
from test_frontend import pytestmark as frontend_pytestmark  # noqa: E402

from acestep_triton.serving.server import TritonServer  # noqa: E402

CHROMIUM_ENV = "ACESTEP_CHROMIUM"
DURATION_S = 3.0


def chromium_path() -> str | None:
    """The browser to drive: ``$ACESTEP_CHROMIUM``, else Debian's chromium on PATH."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


# Decided at collection, so a machine without a browser does not start tritonserver for nothing.
pytestmark = [pytest.mark.skipif(chromium_path() is None,
                                 reason=f"no Chromium found (apt-get install -y chromium, or set {CHROMIUM_ENV})"),
              *frontend_pytestmark]


@pytest.fixture(scope="module")
def page_url(tiny_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_frontend(tiny_server.grpc_url, tmp_path_factory.mktemp("browser_out")) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    executable = chromium_path()
    assert executable is not None  # pytestmark skips otherwise
    with sync_api.sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start.
        instance = playwright.chromium.launch(executable_path=executable, headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield instance
        finally:
            instance.close()


def test_generate_from_the_text2music_tab(browser: sync_api.Browser, page_url: str) -> None:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_url)
    page.wait_for_selector("#text2music_generate", timeout=60_000)
    for tab in ("Text2Music", "Retake", "Repainting", "Edit", "Extend"):
        assert page.get_by_role("tab", name=tab).count() == 1, f"tab {tab} missing"
    assert page.locator("#text2music_audio a[download]").count() == 0, "an audio result before generating"

    duration = page.locator("#audio_duration input[type=number]")
    duration.fill(str(DURATION_S))
    duration.press("Enter")
    page.click("#text2music_generate")

    link = page.wait_for_selector("#text2music_audio a[download]", state="attached", timeout=60_000)
    page.wait_for_selector("#text2music_audio [data-testid^='audio-player']", state="attached", timeout=10_000)
    href = link.get_attribute("href")
    assert href and "acestep_text2music_" in href, href
    response = page.request.get(href)
    assert response.ok, f"{href}: HTTP {response.status}"
    info = sf.info(io.BytesIO(response.body()))
    length = info.frames / info.samplerate
    assert (info.samplerate, info.channels) == (RATE, 2), info
    assert abs(length - DURATION_S) <= FRAME_S, f"asked the form for {DURATION_S} s, got {length:.3f} s"
    assert not errors, f"JavaScript errors on the page: {errors}"
    page.close()


def test_closing_the_page_cancels_its_request(browser: sync_api.Browser, page_url: str,
                                              tiny_server: TritonServer) -> None:
    cancelled = requests_finished(tiny_server, "cancelled")
    succeeded = requests_finished(tiny_server, "success")
    page = browser.new_page()
    page.goto(page_url)
    page.wait_for_selector("#text2music_generate", timeout=60_000)
    page.get_by_text("Basic Settings").first.click()  # the steps slider sits in a closed accordion
    for selector, number in (("#audio_duration input[type=number]", DURATION_S),
                             ("#infer_step input[type=number]", 200)):
        field = page.locator(selector)
        field.fill(str(number))
        field.press("Enter")
    page.click("#text2music_generate")
    # Gradio shows "denoising" with the step counter once the model server streams progress.
    page.wait_for_selector("text=denoising", timeout=120_000)
    page.close()
    wait_for_cancelled_request(tiny_server, cancelled, succeeded)
