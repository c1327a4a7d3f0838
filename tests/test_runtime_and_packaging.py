"""The runtime switch, the canary, the exercise checks, and the project's wiring."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashkv_edu
from flashkv_edu import runtime

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_device_and_interpreter_follow_the_machine():
    assert runtime.DEVICE.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert runtime.INTERPRET
    assert "device=" in runtime.describe()


def test_canary_kernel_runs():
    assert runtime.run_canary()


def test_setup_notebook_prints_one_stable_line(capsys):
    flashkv_edu.setup_notebook(seed=3)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("environment ready: device=")


def test_explicit_interpret_off_is_respected():
    code = "import flashkv_edu.runtime as r; print(r.INTERPRET)"
    env = {"TRITON_INTERPRET": "0", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_importing_triton_first_on_cpu_fails_with_a_hint():
    if torch.cuda.is_available():
        pytest.skip("only CPU-only machines need the interpreter")  # pragma: no cover
    code = "import triton.language; import flashkv_edu"
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "Import flashkv_edu first" in run.stderr



def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).replace('"', "'")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_norm(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip = [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]
    got = {_norm(r) for r in pip if r != "-e ."}
    assert got == wanted, f"environment.yml drifted from pyproject.toml: {got ^ wanted}"
    assert "-e ." in pip


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 run\.py (\w+)$", readme, flags=re.M)
    assert sorted(set(commands)) == ["lab", "test"]
    assert "python3 run.py test" in (ROOT / ".ci" / "run").read_text()


def test_ruff_is_clean():
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is not installed: install the dev extra (pip install -e .[dev])")
    result = subprocess.run([str(ruff), "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
