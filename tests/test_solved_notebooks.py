"""The instructors' solved copies: written by ``python -m flashkv_edu.teach solutions DIR`` and
checked under the same strict nbval as the shipped notebooks. Every check in them prints PASS.

One notebook (:data:`EXECUTED`) goes through the whole command, which executes its copy in a fresh
kernel; strict nbval then runs it again. For the others the command only writes the solutions
(``--no-execute``), each check cell's stored output becomes the verdict its check gives the
solution (which must be PASS), and strict nbval executes the copy once: every cell must reproduce
the shipped notebook's output with the solutions in place. One execution instead of two."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashkv_edu.teach import NOTEBOOKS, all_exercises, module_for
from flashkv_edu.teach.__main__ import defined_name

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = "03_window_size_bug"


def expect_verdicts(path: Path, stem: str) -> None:
    """Store in each check cell of the solved copy ``path`` the line its check prints for the
    solution; every one must be a PASS."""
    import contextlib
    import io

    module = module_for(stem)
    checks = {e.name: e.check for e in module.EXERCISES}
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    for i, cell in enumerate(cells):
        if "exercise" not in cell.get("metadata", {}).get("tags", []):
            continue
        name = defined_name("".join(cell["source"]))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            getattr(module, checks[name])(getattr(module, name))
        verdict = printed.getvalue()
        assert verdict.startswith(f"{checks[name]}: PASS ("), verdict
        check_cell = cells[i + 1]
        assert checks[name] in "".join(check_cell["source"]), (name, check_cell["source"])
        check_cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": verdict.splitlines(keepends=True)}]
    path.write_text(json.dumps(nb, indent=1) + "\n")


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_solved_copies_pass_strict_nbval(tmp_path, stem):
    """One notebook per test, so that the workers share them: the instructors' command writes its
    solved, executed copy, and strict nbval reproduces it."""
    out = tmp_path / "solved"
    execute = stem == EXECUTED
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashkv_edu.teach",
            "solutions",
            str(out),
            "--only",
            stem,
            *([] if execute else ["--no-execute"]),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    notebooks = sorted(out.glob("*.ipynb"))
    assert [nb.stem for nb in notebooks] == [stem]
    exercises = [e for e in all_exercises() if stem.startswith(e.notebook)]
    if not execute:
        expect_verdicts(notebooks[0], stem)
    verdicts = []
    for nb in notebooks:
        for cell in json.loads(nb.read_text())["cells"]:
            for o in cell.get("outputs", []):
                verdicts += [line for line in "".join(o.get("text", "")).splitlines() if line.startswith("check_")]
    assert len(verdicts) >= len(exercises) and all(": PASS (" in v for v in verdicts), verdicts
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--nbval",
            "--nbval-current-env",
            "--nbval-sanitize-with",
            str(ROOT / "tests" / "nbval_sanitize.cfg"),
            "-o",
            "addopts=",
            "-o",
            "testpaths=",
            *map(str, notebooks),
        ],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
