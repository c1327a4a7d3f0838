"""The instructors' solved copies: written by ``python -m flashkv_edu.teach solutions DIR``,
executed, then checked under the same strict nbval as the shipped notebooks. Every check in
them prints PASS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashkv_edu.teach import NOTEBOOKS, all_exercises

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stem", list(NOTEBOOKS))
def test_solved_copies_pass_strict_nbval(tmp_path, stem):
    """One notebook per test, so that the workers share them: the instructors' command writes its
    solved, executed copy, and strict nbval reproduces it."""
    out = tmp_path / "solved"
    run = subprocess.run(
        [sys.executable, "-m", "flashkv_edu.teach", "solutions", str(out), "--only", stem],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    notebooks = sorted(out.glob("*.ipynb"))
    assert [nb.stem for nb in notebooks] == [stem]
    exercises = [e for e in all_exercises() if stem.startswith(e.notebook)]
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
