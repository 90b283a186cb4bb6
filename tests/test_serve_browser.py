"""The web page in a real browser: Debian's Chromium, headless, driven by playwright (its own
browser downloads are never used). Upload an image, watch its caption grow as it streams, wait for
the end; pick a gallery example
and use the decoding controls; Chinese text is drawn with the page's CJK web font.

Without Chromium (or playwright) the test skips locally, but fails under CI (CI set), where
.ci/run installs Chromium with apt-get first.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import time

import pytest

from .conftest import make_model_dir
from .serve_support import build, jpeg_bytes, serve_in_thread

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_or_skip() -> str:
    path = next((p for p in CHROMIUM_CANDIDATES if os.path.exists(p)), None) or shutil.which("chromium")
    problem = None
    if path is None:
        problem = "Debian's chromium is not installed (apt-get install chromium)"
    elif importlib.util.find_spec("playwright") is None:
        problem = "the playwright package is not installed (pip install -r requirements.txt)"
    if problem:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(f"browser test cannot run under CI: {problem}")
        pytest.skip(problem)
    return path


@pytest.mark.slow
def test_page_uploads_an_image_and_shows_its_caption(tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import expect, sync_playwright

    from paddle_caption.predict.predictor import load_predictor

    service, _, app = build(load_predictor(make_model_dir(tmp_path / "model")))
    step = service.engine._step

    def paced_step():  # ~20 tokens a second, so the page has time to show a caption growing
        time.sleep(0.05)
        step()

    service.engine._step = paced_step
    image = tmp_path / "upload.jpg"
    image.write_bytes(jpeg_bytes(3))
    with serve_in_thread(app) as url, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            errors = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url + "/")
            expect(page.locator("#server")).to_contain_text("ok")

            # upload: the caption grows as it streams, then its latency and token count appear
            page.evaluate("""() => {
                window.captionSeen = [];
                new MutationObserver(() => window.captionSeen.push(document.getElementById("caption").textContent))
                    .observe(document.getElementById("caption"), {childList: true, characterData: true, subtree: true});
            }""")
            page.fill("#max-new-tokens", "12")
            page.set_input_files("#file", str(image))
            expect(page.locator("#result")).to_have_attribute("data-done", "true", timeout=30_000)
            assert page.locator("#tokens").inner_text() == "12"
            final = page.locator("#caption").inner_text()
            seen = [text for text in page.evaluate("window.captionSeen") if text]
            growing = [text for text in seen if text != final and final.startswith(text)]
            assert len(growing) >= 2, seen  # parts of the caption were shown before it was complete
            assert float(page.locator("#logprob").inner_text()) < 0
            assert float(page.locator("#latency").inner_text()) > 0
            assert page.locator("#caption").inner_text().strip()
            assert page.locator("#status").inner_text() == ""

            # a gallery example with beam search: its Chinese reference is shown beside the caption
            page.check("input[name=mode][value=beam]")
            expect(page.locator("#num-beams")).to_be_visible()
            first = page.locator("#gallery button").first
            expect(first).to_be_visible(timeout=30_000)
            reference = first.get_attribute("title")
            assert "风格" in reference
            first.click()
            expect(page.locator("#reference")).to_contain_text(reference, timeout=30_000)
            expect(page.locator("#result")).to_have_attribute("data-done", "true", timeout=30_000)

            # Chinese is drawn with the served CJK face, whatever fonts the machine has
            loaded = page.evaluate("async () => (await document.fonts.load('16px CaptionCJK', '风格')).length")
            assert loaded == 1
            # a server error is shown on the page, not swallowed
            page.fill("#max-new-tokens", "100000")
            page.click("#run")
            expect(page.locator("#status")).to_contain_text("error 400", timeout=30_000)
            assert errors == []
        finally:
            context.close()
