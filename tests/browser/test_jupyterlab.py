"""Every notebook in a real JupyterLab, in a real browser: runs clean, widgets live, plots shown.

Select with ``pytest -m browser tests/browser`` (the default test run leaves these out: they need
Debian's ``chromium`` and Playwright). Screenshots go to ``artifacts/browser/``.
"""

from pathlib import Path

import pytest

from .jupyterlab import CHROMIUM, CHROMIUM_ARGS, JupyterLab, copy_notebooks, run_notebook

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "browser"
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def widget_notebooks():
    import json

    found = set()
    for name in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / name).read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code" and any(
                "application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.get("outputs", [])
            ):
                found.add(name)
    return found


WIDGET_NOTEBOOKS = widget_notebooks()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    copy_notebooks(ROOT / "notebooks", tmp / "notebooks")
    server = JupyterLab(tmp / "notebooks", tmp / "state")
    yield server
    server.stop()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


def test_widget_notebooks_are_known():
    assert {"01_naive_attention.ipynb", "03_window_size_bug.ipynb", "05_tiled_triton_kernels.ipynb"} <= WIDGET_NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(notebook, lab, page):
    report = run_notebook(page, lab, notebook, screenshot=ARTIFACTS / notebook.replace(".ipynb", ".png"))
    assert report.errors == []
    assert report.images > 0, "no plot rendered as an image"
    if notebook in WIDGET_NOTEBOOKS:
        assert report.widgets_render, report
        assert report.slider_redraws, "moving the slider did not redraw the figure"


def test_a_widget_that_cannot_render_is_caught(tmp_path, page):
    """With the widget manager disabled (as in a broken install), the same check fails."""
    copy_notebooks(ROOT / "notebooks", tmp_path / "notebooks")
    server = JupyterLab(tmp_path / "notebooks", tmp_path / "state", widgets=False)
    try:
        report = run_notebook(page, server, "01_naive_attention.ipynb", screenshot=ARTIFACTS / "broken_widgets_01.png")
    finally:
        server.stop()
    assert report.errors == [] and report.images > 0
    assert not report.widgets_render
    assert report.live_widgets == 0 and report.widget_reprs + report.loading_widgets >= 1


KERNELS_PLUGIN = "@jupyterlab/apputils-extension:kernels-settings"


def test_widget_messages_are_not_sent_to_subshells(lab):
    """The environment's JupyterLab carries the project's default (run.py installs it): ipykernel 7
    would otherwise run a slider's redraw on a subshell thread while a cell draws with matplotlib,
    which is not thread-safe (a mathtext ParseException in the widget, or a blank figure)."""
    assert lab.setting_default(KERNELS_PLUGIN, "commsOverSubshells") == "disabled", (
        "run `python3 run.py lab-settings` with this environment's Python"
    )


def test_a_slider_redraws_on_the_kernels_main_thread(tmp_path, page):
    import nbformat

    cells = [
        "import threading\nimport ipywidgets as w\nimport matplotlib.pyplot as plt",
        "def probe(x):\n"
        "    fig, ax = plt.subplots(figsize=(3, 2))\n"
        "    ax.plot([0, x])\n"
        "    ax.set_title(f'x = {x}')\n"
        "    plt.show()\n"
        "    print(f'x = {x}, redrawn on', threading.current_thread().name)\n\n\n"
        "w.interactive(probe, x=w.IntSlider(value=1, min=0, max=5))",
        "plt.plot([1, 2])\nplt.show()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "notebooks").mkdir()
    nbformat.write(nb, tmp_path / "notebooks" / "probe.ipynb")
    server = JupyterLab(tmp_path / "notebooks", tmp_path / "state")
    try:
        # ipykernel 7 routes a comm's next message to the subshell its last reply went out on: the
        # first move is handled on the main thread, the second would go to a subshell thread.
        report = run_notebook(page, server, "probe.ipynb", slider_presses=2)
        output = page.locator(".widget-output", has_text="x = 3, redrawn on").first
        output.wait_for(timeout=30_000)
        shown = output.inner_text()
    finally:
        server.stop()
    assert report.errors == [] and report.slider_redraws
    assert "redrawn on MainThread" in shown, shown
