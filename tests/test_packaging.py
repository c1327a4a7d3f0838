"""The project's wiring: setup command, environment files, licence, version, formatting."""

import importlib.metadata
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.version import Version

import flashkv_edu

ROOT = Path(__file__).resolve().parents[1]


def _run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(req: str) -> str:
    return re.sub(r"\s+", "", req).replace('"', "'")


def _lock_for(python: str) -> dict[str, str]:
    """The lock's pins that apply under ``python`` ("3.11"): ``{canonical name: version}``."""
    run = _run_py()
    pins = {}
    for name, version, marker in run.read_lock():
        if not marker or Marker(marker).evaluate({"python_version": python}):
            assert run.canonical(name) not in pins, f"constraints.txt pins {name} twice for Python {python}"
            pins[run.canonical(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    return [Requirement(r) for r in _run_py().project_requirements()]


@pytest.mark.parametrize("python", _run_py().LOCK_PYTHONS)
def test_every_pin_of_the_lock_lies_in_pyprojects_ranges(python):
    run = _run_py()
    pins = _lock_for(python)
    env = {"python_version": python, "platform_system": "Linux", "sys_platform": "linux"}
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = run.canonical(req.name)
        assert name in pins, f"constraints.txt has no pin of {req.name} for Python {python}"
        assert pins[name] in req.specifier, f"{name}=={pins[name]} is outside pyproject's {req}"
    assert all(re.fullmatch(r"[\w.]+", v) for v in pins.values()), "every pin is an exact version"


def test_the_lock_covers_every_python_the_package_accepts():
    run = _run_py()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lowest = re.fullmatch(r">=(3\.\d+).*", project["requires-python"].split("#")[0].strip()).group(1)
    assert run.LOCK_PYTHONS[0] == lowest
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in run.LOCK_PYTHONS


def test_this_environment_is_what_its_lane_installs():
    """The locked lane (``python3 run.py test``, CI) runs exactly the lock; the oldest lane the lock
    with torch, Triton and transformers at their lowest allowed releases; any other environment (the latest lane, a
    user's own) at least versions inside pyproject's ranges."""
    run = _run_py()
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    installed = {run.canonical(d.metadata["Name"]): d.version.split("+")[0] for d in importlib.metadata.distributions()}
    for req in _requirements():
        if req.marker is None or req.marker.evaluate():
            assert installed.get(run.canonical(req.name)) in req.specifier, (req, installed.get(req.name))
    lane = next((name for name, path in run.VENVS.items() if Path(sys.prefix).resolve() == path.resolve()), None)
    if lane not in ("locked", "oldest"):
        return
    want = _lock_for(python)
    if lane == "oldest":
        want.update(dict(pin.split("==") for pin in run.lowest_pins()))
    ignored = {"pip", "setuptools", "wheel", "flashkv-edu"}
    if lane == "oldest":  # the oldest torch is a CUDA build from PyPI: its CUDA libraries are not in the lock
        ignored |= {n for n in installed if n.startswith(("nvidia-", "cuda-"))}
    unlocked = sorted(set(installed) - set(want) - ignored)
    assert not unlocked, f"installed but not in constraints.txt: {unlocked}; run `python3 run.py lock`"
    differ = {n: (want[n], v) for n, v in installed.items() if n in want and Version(v) != Version(want[n])}
    assert not differ, f"(locked, installed) differ: {differ}"


def test_run_py_installs_from_the_lock_and_the_latest_lane_from_the_ranges(tmp_path):
    run = _run_py()
    torch = run.locked_torch()
    assert re.fullmatch(r"torch==[\d.]+", torch)
    for lane in ("locked", "oldest"):
        commands = run.install_commands(Path("python"), torch, lane)
        assert all(["-c", run.LOCK] == cmd[cmd.index("-c") : cmd.index("-c") + 2] for cmd in commands)
        assert commands[0][-1] == torch and commands[1][-2:] != ["-e", "."]
    assert run.install_commands(Path("python"), torch, "oldest")[1][-1] == "transformers==5.20"
    latest = run.install_commands(Path("python"), torch, "latest", tmp_path / "hold.txt")
    assert latest[0][-1] == torch and {"--upgrade", "--upgrade-strategy", "eager"} <= set(latest[1])
    assert run.LOCK not in latest[1] and tmp_path / "hold.txt" in latest[1]  # torch held, the rest free
    # FLASHKV_TORCH: the lock without its torch line, nothing else changed.
    adjusted = run.constraints_for("torch==2.13.0+cpu", tmp_path)
    dropped = set(run.LOCK.read_text().splitlines()) - set(adjusted.read_text().splitlines())
    assert dropped == {line for line in run.LOCK.read_text().splitlines() if line.startswith("torch==")}


def test_lock_text_writes_one_line_per_package_or_one_per_python():
    run = _run_py()
    text = run.lock_text({"3.11": {"a": "1", "b": "2"}, "3.12": {"a": "1", "b": "3", "c": "4"}}, "torch==2", "today")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == ["a==1", 'b==2 ; python_version == "3.11"', 'b==3 ; python_version == "3.12"',
                     'c==4 ; python_version == "3.12"']  # fmt: skip
    assert "python3 run.py lock" in text


def test_environment_yml_installs_from_the_lock():
    run = _run_py()
    lines = (ROOT / "environment.yml").read_text().splitlines()
    python = next(line.split("=", 1)[1] for line in lines if line.strip().startswith("- python="))
    assert python in run.LOCK_PYTHONS
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip = [line.strip()[2:] for line in lines[start + 1 :] if line.strip().startswith("- ")]
    assert "-c constraints.txt" in pip and run.locked_torch() in pip
    assert f"-e .[{','.join(run.EXTRAS)}]" in pip


def test_readme_has_the_two_commands_the_lanes_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^python3 run\.py (\w+)$", readme, flags=re.M)
    assert sorted(set(commands)) == ["lab", "lock", "test"]
    for lane in ("python3 run.py test --latest", "python3 run.py test --oldest"):
        assert lane in readme
    assert re.search(r"^python3 run\.py test$", (ROOT / ".ci" / "run").read_text(), flags=re.M)


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


def test_lab_settings_go_into_the_environments_jupyterlab(tmp_path):
    """run.py's JupyterLab default: widget messages on the kernel's main thread (README)."""
    run = _run_py()
    target = run.install_lab_settings(tmp_path)
    assert target == tmp_path / "share/jupyter/lab/settings/overrides.d/flashkv_edu.json"
    assert target.read_bytes() == run.LAB_SETTINGS.read_bytes()
    assert run.install_lab_settings(tmp_path) == target  # idempotent
    assert "install_lab_settings(venv_dir)" in inspect.getsource(run.setup)


def test_lab_settings_name_a_real_jupyterlab_setting():
    """The override must name a plugin and a value this JupyterLab's schema knows, or JupyterLab
    ignores it without a word."""
    import jupyterlab

    run = _run_py()
    overrides = json.loads(run.LAB_SETTINGS.read_text())
    schemas = Path(jupyterlab.__file__).parent / "schemas"
    if not schemas.exists():
        schemas = Path(sys.prefix) / "share/jupyter/lab/schemas"
    for plugin, values in overrides.items():
        package, name = plugin.split(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text())
        for key, value in values.items():
            allowed = [c["const"] for c in schema["properties"][key]["oneOf"]]
            assert value in allowed, (plugin, key, allowed)
    assert overrides == {"@jupyterlab/apputils-extension:kernels-settings": {"commsOverSubshells": "disabled"}}


def test_the_test_command_shares_the_cores_between_its_workers():
    run = _run_py()
    arguments = run.parallel_arguments([], 2)
    assert arguments[:4] == ["-n", "2", "--dist", "loadfile"] and "--durations=10" in arguments
    assert run.worker_threads(arguments, 2, {}) == {"OMP_NUM_THREADS": "1"}
    assert run.worker_threads(run.parallel_arguments([], 16), 16, {}) == {"OMP_NUM_THREADS": "8"}
    assert run.worker_threads(arguments, 2, {"OMP_NUM_THREADS": "2"}) == {}  # the caller's choice stands
    assert run.worker_threads(run.parallel_arguments([], 1), 1, {}) == {}  # one process: torch's default
    assert run.parallel_arguments(["-p", "no:xdist"], 2)[:1] != ["-n"]


def test_the_workers_share_the_solved_copies_one_by_one_and_keep_each_notebook_together():
    from conftest import SPREAD, spread_scope
    from xdist.scheduler import LoadFileScheduling

    file_scope = LoadFileScheduling._split_scope.__get__(object.__new__(LoadFileScheduling))
    solved = "tests/test_solved_notebooks.py::test_solved_copies_pass_strict_nbval[02_kv_cache]"
    assert spread_scope(solved, file_scope) == solved
    assert spread_scope("notebooks/02_kv_cache.ipynb::Cell 7", file_scope) == "notebooks/02_kv_cache.ipynb"
    assert spread_scope("tests/test_split.py::test_num_splits_limits", file_scope) == "tests/test_split.py"
    for prefix in SPREAD:  # each names tests that exist (a rename would quietly stop the sharing)
        path, name = prefix.split("::")
        text = (ROOT / path).read_text()
        assert not name or f"def {name.rstrip('[')}(" in text, prefix
