"""The course website (``python3 run.py site``): built offline from the stored outputs, one page per
notebook in chain order, widget cells with their stored pictures, and nothing fetched from
elsewhere (scripts, styles, images, MathJax all local). The browser suite opens every page."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    return _run_py().build_site(tmp / "site", tmp / "source")


def _notebooks():
    return sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_has_a_page_in_chain_order(site):
    index = (site / "index.html").read_text()
    pages = [m for m in re.findall(r'href="(\d\d_[a-z0-9_]+)\.html"', index)]
    order = list(dict.fromkeys(pages))
    assert order == _notebooks()
    for stem in _notebooks():
        assert (site / f"{stem}.html").exists()
    text = re.sub(r"<[^>]+>", "", index)  # the page's text, highlighting spans removed
    assert "python3 run.py test" in text and "For instructors" in text  # the README's guide


def test_nothing_is_fetched_from_elsewhere(site):
    remote = []
    for page in site.rglob("*.html"):
        text = page.read_text()
        for tag, attr in (("script", "src"), ("link", "href"), ("img", "src"), ("iframe", "src")):
            for value in re.findall(rf"<{tag}\b[^>]*\b{attr}=\"([^\"]+)\"", text):
                if re.match(r"(https?:)?//", value):
                    remote.append((page.name, tag, value))
    assert not remote, remote
    assert (site / "_static" / "mathjax" / "tex-chtml.js").exists()
    assert (site / "searchindex.js").exists()


def test_widget_cells_show_their_stored_picture(site):
    run_py = _run_py()
    for stem in _notebooks():
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        views = [
            o["data"][run_py.WIDGET_VIEW]["model_id"]
            for c in nb["cells"]
            for o in c.get("outputs", [])
            if run_py.WIDGET_VIEW in o.get("data", {})
        ]
        page = (site / f"{stem}.html").read_text()
        if views:
            assert "Interactive in JupyterLab" in page, stem
            assert all(run_py.widget_pictures(nb, v) for v in views), stem  # each widget has a picture
        stored = sum("image/png" in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))
        pictures = sum(len(run_py.widget_pictures(nb, v)) for v in views)
        assert len(re.findall(r"<img\b", page)) >= stored + pictures, stem


def test_notebook_mentions_link_to_their_pages(site):
    page = (site / "05_tiled_triton_kernels.html").read_text()
    assert 'href="04_online_softmax.html"' in page
