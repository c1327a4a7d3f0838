"""The project's wiring: setup command, environment files, licence, version, formatting."""

import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

import flashkv_edu

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).replace('"', "'")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {
        _norm(r)
        for r in project["dependencies"]
        + project["optional-dependencies"]["dev"]
        + project["optional-dependencies"]["hf"]
    }
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip = [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]
    got = {_norm(r) for r in pip if r != "-e ."}
    assert got == wanted, f"environment.yml drifted from pyproject.toml: {got ^ wanted}"
    assert "-e ." in pip


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 run\.py (\w+)$", readme, flags=re.M)
    assert sorted(set(commands)) == ["lab", "test"]
    assert "python3 run.py test" in (ROOT / ".ci" / "run").read_text()


def test_ruff_is_clean():
    result = _ruff("check")
    assert result.returncode == 0, result.stdout + result.stderr


def _ruff(*args):
    ruff = Path(sys.executable).with_name("ruff")
    if not ruff.exists():
        pytest.fail("ruff is not installed: install the dev extra (pip install -e .[dev])")
    return subprocess.run([str(ruff), *args, str(ROOT)], capture_output=True, text=True)


def test_ruff_format_is_applied():
    result = _ruff("format", "--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_pre_commit_runs_ruff_check_and_format():
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert "ruff check" in config and "ruff format" in config
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(r.startswith("pre-commit") for r in project["optional-dependencies"]["dev"])


def test_files_named_in_environment_yml_exist():
    named = re.findall(r"tests/\w+\.py", (ROOT / "environment.yml").read_text())
    assert named and all((ROOT / n).exists() for n in named), named


def test_mit_license_is_shipped():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_version_is_kept_in_one_place():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flashkv_edu.__version__"}
    assert importlib.metadata.version("flashkv_edu") == flashkv_edu.__version__


def test_lab_as_root_allows_root_and_says_so(capsys):
    run = _run_py()
    as_root = run.lab_arguments([], euid=0)
    assert "--allow-root" in as_root and "allow-root" in capsys.readouterr().out
    assert "--allow-root" not in run.lab_arguments([], euid=1000)
    assert run.lab_arguments(["--allow-root"], euid=0).count("--allow-root") == 1
    assert run.lab_arguments(["--port", "9999"], euid=None)[-2:] == ["--port", "9999"]


def test_a_venv_without_pip_gets_pip_back(tmp_path):
    run = _run_py()
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    assert not run.has_pip(python)
    run.ensure_pip(env_dir, python)
    assert run.has_pip(python)
