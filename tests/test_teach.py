"""The course's exercises as a whole: enough practice, stubs tagged in the notebooks, the
instructors' solved copies, bug hunts that start from the real buggy code, readable pictures.
Each notebook's checks are tested in ``tests/test_teach_nbNN.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashkv_edu as fk
from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import NOTEBOOKS, all_exercises, module_for
from flashkv_edu.teach.__main__ import exercise_table

ROOT = Path(__file__).resolve().parents[1]


def test_the_course_has_enough_practice():
    ex = all_exercises()
    assert len(ex) >= 24 and sum(e.triton for e in ex) >= 8 and sum(e.bug_hunt for e in ex) >= 6
    assert all(e.source.startswith("https://") for e in ex if e.bug_hunt)
    for stem in NOTEBOOKS:
        assert 2 <= len(module_for(stem).EXERCISES) <= 4


def test_notebooks_ship_stubs_with_tags_and_the_readme_table_is_current():
    """Each exercise is a stub cell tagged ``exercise`` (bug hunts also ``bug-hunt``) that
    raises NotImplementedError, followed by its check; the README holds the current table."""
    from flashkv_edu.teach.__main__ import defined_name

    for stem in NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        cells = nb["cells"]
        module = module_for(stem)
        found = {}
        for i, cell in enumerate(cells):
            tags = cell.get("metadata", {}).get("tags", [])
            if "exercise" in tags:
                src = "".join(cell["source"])
                name = defined_name(src)
                found[name] = ("bug-hunt" in tags, src, "".join(cells[i + 1]["source"]))
        want = {e.name: e for e in module.EXERCISES}
        assert set(found) == set(want), stem
        for name, (bug, src, check_src) in found.items():
            assert bug == want[name].bug_hunt, name
            assert want[name].check in check_src, name
            assert "raise NotImplementedError" in src, name
            if bug:
                assert want[name].source in "".join("".join(c["source"]) for c in cells), name
    assert exercise_table() in (ROOT / "README.md").read_text()


def test_solutions_command_writes_solved_copies(tmp_path):
    """The instructors' command on one notebook, without executing (the nbval test below runs
    the executed copies)."""
    run = subprocess.run(
        [sys.executable, "-m", "flashkv_edu.teach", "solutions", str(tmp_path), "--no-execute"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    nb = json.loads((tmp_path / "01_naive_attention.ipynb").read_text())
    cells = [c for c in nb["cells"] if "exercise" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 3 and not any("NotImplementedError" in "".join(c["source"]) for c in cells)
    nb = json.loads((tmp_path / "11_when_the_cache_does_not_fit.ipynb").read_text())
    solved = ["".join(c["source"]) for c in nb["cells"] if "bug-hunt" in c.get("metadata", {}).get("tags", [])]
    assert solved[0].startswith("from flashkv_edu.paged import block_hash")  # what the function needs is kept
    assert "(len(tokens) - 1) // block_size" in solved[0]


def test_the_shipped_buggy_code_fails_its_check(capsys):
    """A bug hunt starts from the real buggy code: with the `raise` line deleted and nothing
    else changed, its check fails and names the failing case."""
    for stem in NOTEBOOKS:
        module = module_for(stem)
        nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())
        for cell in nb["cells"]:
            if "bug-hunt" not in cell.get("metadata", {}).get("tags", []):
                continue
            src = "\n".join(
                line for line in "".join(cell["source"]).splitlines() if "raise NotImplementedError" not in line
            )
            namespace = {"torch": torch, "fk": fk, "triton": triton, "tl": tl}
            exec(src, namespace)
            from flashkv_edu.teach.__main__ import defined_name

            name = defined_name(src)
            ex = next(e for e in module.EXERCISES if e.name == name)
            assert getattr(module, ex.check)(namespace[name]) is False, name
            assert capsys.readouterr().out.startswith(f"{ex.check}: FAIL on "), name


def test_every_picture_reads_at_full_zoom():
    """Stored figures are at least 900 px wide (JupyterLab shows them 1:1), and no text in the
    teaching files or notebooks is set below 10 points."""
    import base64
    import json
    import re
    import struct

    root = Path(__file__).resolve().parents[1]
    narrow = []
    for path in sorted((root / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for out in cell.get("outputs", []):
                png = out.get("data", {}).get("image/png")
                if png:
                    width = struct.unpack(">I", base64.b64decode(png)[16:20])[0]
                    if width < 900:
                        narrow.append((path.name, i, width))
    assert not narrow, f"figures narrower than 900 px: {narrow}"
    sources = [*(root / "flashkv_edu" / "teach").glob("nb*.py"), *(root / "notebooks").glob("*.ipynb")]
    small = [(p.name, m) for p in sources for m in re.findall(r"fontsize=\s*([0-9.]+)", p.read_text()) if float(m) < 10]
    assert not small, f"text below 10 points: {small}"
    from flashkv_edu import runtime

    runtime.setup_notebook()
    import matplotlib

    rc = matplotlib.rcParams
    assert rc["figure.figsize"][0] * rc["figure.dpi"] >= 900 and rc["font.size"] >= 10
    assert all(rc[k] >= 10 for k in ("xtick.labelsize", "ytick.labelsize", "legend.fontsize", "axes.labelsize"))


def test_every_notebook_has_its_exercise_tests():
    """One test file per teaching file: ``tests/test_teach_nbNN.py`` for ``teach/nbNN_<topic>.py``."""
    for stem, module in NOTEBOOKS.items():
        assert (ROOT / "tests" / f"test_teach_{module[:4]}.py").exists(), stem


def test_a_reply_whose_wake_up_was_lost_is_found_within_a_slice():
    """nbclient#312: the execute reply sits on the shell socket, but the wait for it only looks again
    when its timeout ends. ``wait_in_slices`` looks again every slice, and still gives up at the
    timeout when nothing comes."""
    import asyncio
    import time
    from queue import Empty

    from flashkv_edu.teach.__main__ import wait_in_slices

    class LostWakeUp:  # a channel that sees a waiting message only when a wait starts
        def __init__(self, ready_at):
            self.ready_at = ready_at

        async def get_msg(self, timeout=None):
            if time.monotonic() >= self.ready_at:
                return {"msg_type": "execute_reply"}
            await asyncio.sleep(timeout)
            raise Empty

    channel = LostWakeUp(time.monotonic() + 0.2)
    wait_in_slices(channel, slice_s=0.05)
    start = time.monotonic()
    assert asyncio.run(channel.get_msg(timeout=30))["msg_type"] == "execute_reply"
    assert time.monotonic() - start < 2  # the unsliced wait takes the whole 30 s

    never = LostWakeUp(float("inf"))
    wait_in_slices(never, slice_s=0.05)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(never.get_msg(timeout=0.3))
    assert 0.3 <= time.monotonic() - start < 2
