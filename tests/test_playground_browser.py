"""The playground page at `/`, served by a real server (dev preset, size level 256) and used in a real headless
Chromium (Debian's `chromium`, driven by Playwright; never a downloaded browser): load it, see the dev preset
called out, get an API error shown as its message, upload ../shared/examples/0000.jpg, run a streamed edit, watch
the progress bar and the events, get the result with its seed. The screenshot goes to test-artifacts/playground.png
(STEP1X_UPDATE_SCREENSHOT=1 also refreshes docs/playground.png, the README's picture).

Without the browser the test fails (`.ci/run` installs it); STEP1X_SKIP_BROWSER=1 skips it on purpose.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from server_fixtures import KEY, dev_settings, start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("STEP1X_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = start_server(dev_settings(tmp_path_factory.mktemp("playground"), api_keys=KEY))
    yield server
    server.stop()


# --- without a browser -------------------------------------------------------------------------------------------
def test_page_and_files_are_served_without_a_key_and_load_nothing_from_outside(srv):
    page = httpx.get(srv.base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Step1X-Edit" in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        resp = httpx.get(f"{srv.base_url}/static/{name}", timeout=10)
        assert resp.status_code == 200 and kind in resp.headers["content-type"]
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", resp.text)
        assert "@import" not in resp.text
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # no CDN: the page works offline
    missing = httpx.get(srv.base_url + "/static/nope.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert httpx.get(srv.base_url + "/v1/models", timeout=10).status_code == 401  # the API still needs the key
    assert "/" not in srv.app.openapi()["paths"]


# --- in Chromium -------------------------------------------------------------------------------------------------
def _playwright():
    if os.environ.get("STEP1X_SKIP_BROWSER") == "1":
        pytest.skip(reason="STEP1X_SKIP_BROWSER=1: the browser test is skipped on purpose")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[test]' (or set STEP1X_SKIP_BROWSER=1)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM}: apt-get install chromium chromium-driver "
                    "(.ci/run does it), or set STEP1X_SKIP_BROWSER=1")
    return sync_playwright


def test_playground_edit_in_a_real_browser(srv, examples_dir):
    sync_playwright = _playwright()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(srv.base_url + "/")

            # no key yet: the header says so in words (it showed the API's raw 401 sentence)
            page.wait_for_selector("#model .pill.bad")
            header = page.inner_text("#model")
            assert "API key needed" in header and "enter it" in header.lower(), header
            assert "Authorization" not in header and "Bearer" not in header and "401" not in header, header

            # the defaults are values, drawn like values (they were grey, like placeholders)
            ink = page.evaluate("getComputedStyle(document.getElementById('prompt')).color")
            for field in ("steps", "guidance", "strength", "seed", "n", "partial", "size", "format", "negative"):
                color = page.evaluate(f"getComputedStyle(document.getElementById('{field}')).color")
                assert color == ink, (field, color, ink)
            assert page.evaluate("getComputedStyle(document.querySelector('label')).color") != ink
            # and the less obvious ones are explained on the page, not only in a tooltip
            assert "random" in page.inner_text("#hint-seed")
            assert "while" in page.inner_text("#hint-partial") and "0" in page.inner_text("#hint-partial")
            assert "your image's size" in page.inner_text("#hint-size")
            for field, hint in (("seed", "hint-seed"), ("partial", "hint-partial"), ("size", "hint-size")):
                assert page.get_attribute(f"#{field}", "aria-describedby") == hint
            page.evaluate("""async () => {  // dropping a file works too (a 3x2 PNG made in the page)
                const canvas = Object.assign(document.createElement('canvas'), {width: 3, height: 2});
                const blob = await new Promise((done) => canvas.toBlob(done, 'image/png'));
                const dt = new DataTransfer();
                dt.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
                document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
            }""")
            page.wait_for_function("document.getElementById('file-info').textContent === 'dropped.png · 3×2'")
            page.set_input_files("#file", str(examples_dir / "0000.jpg"))
            page.wait_for_function("document.getElementById('file-info').textContent.includes('1024')")
            page.fill("#prompt", "Convert to quick pencil sketch")
            page.click("#run")
            page.wait_for_selector("#error:not([hidden])")
            assert "needs an API key" in page.inner_text("#error")
            assert "Authorization" not in page.inner_text("#error")

            # with the key (kept in the browser): the model card says dev preset, loudly
            page.fill("#key", KEY)
            page.click("#key-save")
            page.wait_for_selector("#dev-banner:not([hidden])")
            assert "DEV PRESET" in page.inner_text("#model")
            assert page.evaluate("localStorage.getItem('step1x-edit.apiKey')") == KEY

            page.fill("#steps", "4")
            page.fill("#partial", "2")
            page.fill("#seed", "1234")
            page.select_option("#format", "webp")  # OpenAI's output_format: previews and results in WebP
            page.evaluate("""() => {
                window.barValues = [];
                const bar = document.getElementById('progress');
                new MutationObserver(() => window.barValues.push([+bar.value, +bar.max]))
                    .observe(bar, {attributes: true});
            }""")
            page.click("#run")
            page.wait_for_selector(".card", timeout=120_000)
            page.wait_for_function("document.getElementById('run').disabled === false")

            assert page.is_hidden("#error")
            types = page.evaluate("window.step1x.events.map(e => e.type)")
            steps = page.evaluate("window.step1x.events.filter(e => e.type.endsWith('.progress')).map(e => e.step)")
            assert steps == [0, 1, 2, 3, 4]
            assert types.count("image_edit.partial_image") == 2 and types[-1] == "image_edit.completed"
            bar = page.evaluate("window.barValues")
            assert [v for v, m in bar if m == 4 and 0 < v < 4], bar  # the bar advanced through the steps
            assert page.evaluate("[document.getElementById('progress').value, document.getElementById('progress').max]") == [4, 4]
            assert page.inner_text(".card .seed") == "seed 1234"
            assert "seed 1234" in page.inner_text("#status") and "1024x1536" in page.inner_text("#status")
            assert page.get_attribute(".card a", "download") == "step1x-edit-1234.webp"
            assert set(page.evaluate("window.step1x.events.filter(e => e.b64_json).map(e => e.output_format)")) == {
                "webp"}
            assert page.is_visible("#compare")
            page.wait_for_function("document.getElementById('cmp-after').naturalWidth === 1024")
            assert page.evaluate("document.getElementById('cmp-before').naturalHeight") == 1536
            page.fill("#cmp-range", "35")  # the before/after slider moves the split
            page.dispatch_event("#cmp-range", "input")
            assert "35%" in page.get_attribute("#cmp-after-wrap", "style")
            assert errors == []

            page.click("#log-box summary")  # the timeline, open in the screenshot
            assert page.locator("#log li").count() == len(types)
            timeline = page.inner_text("#log-box")
            # plain words, not the raw event names of a debugging console
            assert "image_edit." not in timeline and "Events" not in timeline, timeline
            assert "Step 1 of 4" in timeline and "Preview 1 of 2" in timeline and "seed 1234" in timeline, timeline
            assert re.search(r"\d+\.\d s", timeline), timeline
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("STEP1X_UPDATE_SCREENSHOT") == "1":
                _small_png(shot, REPO / "docs" / "playground.png")
        finally:
            browser.close()


def _small_png(src: Path, dst: Path) -> None:
    """The README's copy: 256 colours, so the (noise) result does not make it large."""
    from PIL import Image

    with Image.open(src) as img:
        img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            dst, optimize=True)
