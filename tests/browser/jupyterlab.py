"""Drive the notebooks in a real JupyterLab with Debian's Chromium through Playwright.

Nothing is downloaded: JupyterLab comes from the project's environment and the browser from
``/usr/bin/chromium`` (``apt-get install chromium``). The server runs on a free loopback port with
a random token, with every Jupyter/IPython/matplotlib setting directory in a temporary folder,
and is always shut down.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDGET_MANAGER = "@jupyter-widgets/jupyterlab-manager"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server over ``root_dir`` (optionally with the widget manager disabled)."""

    def __init__(self, root_dir: Path, state_dir: Path, *, widgets: bool = True):
        self.root_dir, self.port, self.token = root_dir, free_port(), secrets.token_hex(16)
        env = dict(os.environ)
        for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):
            path = state_dir / name.lower()
            path.mkdir(parents=True, exist_ok=True)
            env[name] = str(path)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        settings = state_dir / "jupyter_config_dir" / "lab" / "user-settings" / "@jupyterlab"
        (settings / "notebook-extension").mkdir(parents=True, exist_ok=True)
        # Render every cell (JupyterLab 4 otherwise keeps off-screen cells out of the page).
        (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
        (settings / "apputils-extension").mkdir(parents=True, exist_ok=True)
        (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
        if not widgets:
            labconfig = state_dir / "jupyter_config_dir" / "labconfig"
            labconfig.mkdir(parents=True, exist_ok=True)
            (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": {WIDGET_MANAGER: True}}))
        self.log = open(state_dir / "jupyterlab.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jupyter",
                "lab",
                "--allow-root",
                "--no-browser",
                "--ip=127.0.0.1",
                f"--port={self.port}",
                "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}",
                f"--ServerApp.root_dir={root_dir}",
                "--LabApp.expose_app_in_browser=True",
                "--LabApp.news_url=None",
                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited early (code {self.proc.returncode})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status?token={self.token}", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("JupyterLab did not answer /api/status")

    def url(self, notebook: str) -> str:
        # ?reset: a fresh workspace, so tabs of earlier notebooks do not come back
        return f"http://127.0.0.1:{self.port}/lab/tree/{notebook}?reset&token={self.token}"

    def setting_default(self, plugin: str, key: str):
        """The default JupyterLab gives ``key`` of ``plugin``: the schema's, or the overrides.d one."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/lab/api/settings/?token={self.token}") as r:
            plugins = {p["id"]: p for p in json.loads(r.read())["settings"]}
        return plugins[plugin]["schema"]["properties"][key]["default"]

    def shutdown_kernels(self) -> None:
        """Stop every running kernel through the REST API (one notebook at a time stays light)."""
        base = f"http://127.0.0.1:{self.port}/api/kernels"
        with urllib.request.urlopen(f"{base}?token={self.token}", timeout=10) as r:
            kernels = json.loads(r.read())
        for k in kernels:
            req = urllib.request.Request(f"{base}/{k['id']}?token={self.token}", method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


KERNEL_IDLE = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!(k && k.status === 'idle' && w.content && w.content.model);
}"""

ALL_EXECUTED = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = w.content.model.cells;
  let code = 0, done = 0;
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type === 'code') { code++; if (c.executionCount) done++; }
  }
  const s = w.sessionContext.session;
  return code > 0 && done === code && !!(s && s.kernel && s.kernel.status === 'idle');
}"""

ERROR_OUTPUTS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells;
  const errors = [];
  for (let i = 0; i < cells.length; i++) {
    const c = cells.get(i);
    if (c.type !== 'code') continue;
    for (const o of c.outputs.toJSON()) {
      if (o.output_type === 'error') errors.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  }
  return errors;
}"""


@dataclass
class NotebookReport:
    """What a learner would see after running every cell."""

    errors: list
    live_widgets: int
    loading_widgets: int
    widget_reprs: int
    images: int
    slider_redraws: bool | None = None

    @property
    def widgets_render(self) -> bool:
        """Every widget is a live control: none stuck loading, none shown as a text repr."""
        return self.live_widgets > 0 and self.loading_widgets == 0 and self.widget_reprs == 0


def run_notebook(
    page,
    lab: JupyterLab,
    notebook: str,
    screenshot: Path | None = None,
    timeout_ms: int = 240_000,
    slider_presses: int = 1,
) -> NotebookReport:
    """Open ``notebook``, clear and run all cells, move the first slider, and report errors,
    widgets and images."""
    page.set_default_timeout(timeout_ms)
    page.goto(lab.url(notebook))
    page.wait_for_function(KERNEL_IDLE, timeout=timeout_ms)
    # Fire the commands without awaiting their promises (a pending dialog would block forever).
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs'); return 1; }")
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); return 1; }")
    page.wait_for_function(ALL_EXECUTED, timeout=timeout_ms, polling=500)
    page.wait_for_timeout(1500)  # let widget views and images attach
    panel = page.locator("#" + page.evaluate("window.jupyterapp.shell.currentWidget.id"))
    text = panel.locator(".jp-Cell-outputArea").all_inner_texts()
    report = NotebookReport(
        errors=page.evaluate(ERROR_OUTPUTS),
        live_widgets=panel.locator(".jp-Cell-outputArea .jupyter-widgets.widget-slider").count(),
        loading_widgets=sum("Loading widget..." in t for t in text),
        widget_reprs=sum("interactive(children=" in t for t in text),
        images=panel.locator('.jp-Cell-outputArea img[src^="data:image/png"]').count(),
    )
    try:
        if report.live_widgets:
            report.slider_redraws = move_first_slider(page, panel, presses=slider_presses)
    finally:  # the picture of a failure is the one worth keeping
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot))
        lab.shutdown_kernels()
    return report


def move_first_slider(page, panel, timeout_ms: int = 60_000, presses: int = 1) -> bool:
    """Press ArrowRight on the first widget slider ``presses`` times; True if the picture in its
    output changed after every press."""
    widget = panel.locator(".jp-Cell-outputArea .widget-interact").first
    widget.scroll_into_view_if_needed()
    image = widget.locator(".widget-output img").first
    try:
        image.wait_for(timeout=timeout_ms)
    except Exception as exc:  # say what the widget shows instead (often a traceback)
        shown = widget.locator(".widget-output").first.inner_text()[-3000:]
        raise AssertionError(f"the widget drew no picture; it shows:\n{shown}") from exc
    handle = widget.locator(".noUi-handle").first
    for _ in range(presses):
        before = image.get_attribute("src")
        handle.focus()
        page.keyboard.press("ArrowRight")
        if not picture_changes(page, widget, before, timeout_ms):
            return False
    return True


def picture_changes(page, widget, before: str | None, timeout_ms: int) -> bool:
    deadline = time.time() + timeout_ms / 1000
    while time.time() < deadline:
        images = widget.locator(".widget-output img")
        if images.count() and images.first.get_attribute("src") not in (None, before):
            return True
        page.wait_for_timeout(250)
    return False


def copy_notebooks(src: Path, dst: Path) -> list[str]:
    """Copy the notebooks (so running them in the browser never rewrites the repository's)."""
    dst.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in src.glob("*.ipynb"))
    for name in names:
        shutil.copy(src / name, dst / name)
    return names
