"""The course website in a real browser: every page opens from a local server, its figures load,
its math is typeset by the bundled MathJax, search works, and no request leaves localhost.
Screenshots go to ``artifacts/site/``."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from .jupyterlab import CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "site"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.test_site import _run_py

    site = _run_py().build_site(tmp_path_factory.mktemp("site") / "site", tmp_path_factory.mktemp("source"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield site, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, base):
    page = browser.new_page(viewport={"width": 1300, "height": 900})
    outside = []

    def route(r):
        if r.request.url.startswith(base):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return page, outside


PAGES = ["index"] + sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("name", PAGES)
def test_a_page_loads_its_figures_and_math_from_localhost_only(served, browser, name):
    site, base = served
    page, outside = _open(browser, base)
    page.goto(f"{base}/{name}.html")
    page.wait_for_load_state("networkidle")
    math = page.evaluate("document.querySelectorAll('.math').length")
    if math:  # every .math element typeset: MathJax puts an mjx-container into each
        typeset = "document.querySelectorAll('.math mjx-container').length"
        page.wait_for_function(f"{typeset} >= document.querySelectorAll('.math').length", timeout=20000)
    images = page.evaluate("Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.src.slice(-60)])")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    page.close()
    assert not outside, outside
    assert all(ok for ok, _ in images), [src for ok, src in images if not ok]
    if name != "index":
        assert len(images) >= 1 and math >= 1


def test_search_works_offline(served, browser):
    site, base = served
    page, outside = _open(browser, base)
    page.goto(f"{base}/search.html?q=softmax")
    page.wait_for_function("document.querySelectorAll('#search-results li').length > 0", timeout=20000)
    hits = page.evaluate("Array.from(document.querySelectorAll('#search-results li a')).map(a => a.href)")
    page.close()
    assert not outside and any("04_online_softmax" in h for h in hits), hits
