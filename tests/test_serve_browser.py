"""The page of `mmt serve` in a real browser (Playwright driving the system's Chromium): `mmt serve`
started on a free loopback port, an image uploaded, a question asked, a caption and a search, and
images drawn from a sentence.

Skips, saying why, where Playwright or Chromium is missing. MMT_CHROMIUM names another browser
binary; MMT_SERVE_SCREENSHOT a file to save the phone-size screenshot to (docs/usage/serve.png).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmt.cli import main
from tests.tasks.test_t2i import TINY_T2I, TINY_VQVAE, sets
from tests.test_api import saved

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("MMT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picture(path, seed):
    """A scene like the built-in worlds': shapes on white."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    for colour in ("red", "blue", "green"):
        x, y = rng.integers(4, 48, 2)
        draw.ellipse((x, y, x + 12, y + 12), fill=colour) if rng.random() < 0.5 else draw.rectangle((x, y, x + 12, y + 12), fill=colour)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import playwright.sync_api as playwright
    except ImportError as e:
        pytest.skip(f"the browser test needs playwright (pip install playwright): {e}")
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium, or set MMT_CHROMIUM)")
    pytest.importorskip("faiss", reason="the page's search needs faiss (the search extra)")
    from mmt.data.answers import AnswerVocab
    from mmt.search import build_index

    root = tmp_path_factory.mktemp("browser")
    vqa, _ = saved(root, "vqa-small", num_answers=3)
    AnswerVocab(["yes", "no", "2"]).save(vqa / "answers.json")
    caption, _ = saved(root, "caption-tiny", vocab_size=14)
    retrieval, _ = saved(root, "retrieval-tiny")
    gallery = root / "gallery"
    gallery.mkdir()
    for i in range(6):
        _picture(gallery / f"scene-{i}.png", i)
    build_index(retrieval, gallery, root / "index", progress=False)
    assert main(["train", "vqvae", str(root / "vqvae"), "--preset", "vqvae-tiny", "--no-progress", *sets(TINY_VQVAE)]) == 0
    t2i = ["train", "t2i", str(root / "t2i"), "--preset", "t2i-tiny", "--no-progress", *sets(TINY_T2I + [f"image_tokenizer={root / 'vqvae'}"])]
    assert main(t2i) == 0
    port = _free_port()
    command = [sys.executable, "-m", "mmt.cli", "serve", f"vqa={vqa}", f"caption={caption}", f"retrieval={retrieval}", f"t2i={root / 't2i'}",
               "--index", str(root / "index"), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if process.poll() is not None:
                pytest.fail(f"mmt serve stopped: {process.stdout.read()}")
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("mmt serve did not answer /healthz within a minute")
        yield url, _picture(root / "question.png", 42), playwright
    finally:
        process.terminate()
        process.wait(30)


def test_the_page_answers_captions_and_searches(server, tmp_path):
    url, picture, playwright = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
            page.set_default_timeout(60_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#vqa-section:not([hidden])")
            assert "vqa (vqa)" in page.text_content("#served")
            page.set_input_files("#file", str(picture))
            page.wait_for_function("document.getElementById('preview').naturalWidth > 0")

            page.fill("#question", "a red circle")
            page.click("#ask")
            page.wait_for_function("document.getElementById('answer-heat').naturalWidth > 0")
            assert page.text_content("#answer").split(" (")[0] in ("yes", "no", "2")

            page.click("#caption-button")
            page.wait_for_function("document.getElementById('caption-heat').naturalWidth > 0")
            assert page.text_content("#caption").strip()

            page.fill("#search-text", "a red circle")
            page.click("#search")
            page.wait_for_function("document.querySelectorAll('#hits img').length === 6"
                                   " && [...document.querySelectorAll('#hits img')].every(i => i.complete && i.naturalWidth > 0)")
            assert "6 best matches in index" in page.text_content("#search-status")
            assert all(name.startswith("scene-") for name in page.eval_on_selector_all("#hits img", "els => els.map(e => e.alt.split('/').pop())"))
            page.click("#search-image")
            page.wait_for_function("document.querySelectorAll('#hits img').length === 6")
            assert "6 best matches" in page.text_content("#search-status")

            page.fill("#draw-text", "a small red circle")
            page.click("#draw")
            page.wait_for_function("document.querySelectorAll('#drawings img').length === 4"
                                   " && [...document.querySelectorAll('#drawings img')].every(i => i.complete && i.naturalWidth === 32)")
            assert page.text_content("#draw-status").startswith("a small red circle (seed ")

            assert page.is_hidden("#error") and not errors, errors
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"the page is {width} px wide on a 390 px screen"
            page.fill("#question", "")
            page.click("#ask")
            page.wait_for_selector("#error:not([hidden])")
            assert "question" in page.text_content("#error")  # the server's reason, shown
            page.fill("#question", "a red circle")
            page.click("#ask")
            page.wait_for_selector("#ask:not([disabled])")
            assert page.is_hidden("#error")
            shot = os.environ.get("MMT_SERVE_SCREENSHOT") or str(tmp_path / "serve.png")
            page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
