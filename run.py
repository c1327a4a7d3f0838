#!/usr/bin/env python3
"""Set up flashkv_edu in ./.venv and either open JupyterLab or run the whole test suite.

    python3 run.py lab             # set up from the lock, then open JupyterLab on notebooks/
    python3 run.py test            # set up from the lock, then run unit tests, property tests and nbval
                                   # (on 2 cores: pytest-xdist, each notebook on one worker)
    python3 run.py test --latest   # the upgrade lane: ./.venv-latest with the newest releases
                                   # pyproject.toml allows (torch as locked), then the same suite
    python3 run.py test --oldest   # ./.venv-oldest: the lock, but torch, Triton and transformers at
                                   # the oldest releases pyproject.toml allows, then the same suite
    python3 run.py test --hosted   # ./.venv-hosted: a hosted runtime mimicked (its own torch, an older
                                   # Triton), `run.py hosted` must keep both; PyTorch-path tests
    python3 run.py site            # set up from the lock, then build the course website into build/site/
                                   # from the notebooks' stored outputs (offline; see README)
    python3 run.py lock            # refresh constraints.txt (maintainers; see README)
    python3 run.py hosted          # a hosted runtime (Colab, a cluster): install into the running
                                   # Python next to the torch (and Triton) it has, changing neither
    python3 run.py lab-settings    # give the running Python's JupyterLab the project's setting
                                   # defaults (a conda env from environment.yml; see README)

Needs only Python >= 3.11 and pip. Everything is installed with ``pip install -c constraints.txt``,
the lock: the exact versions CI tested, so a fresh clone gets what CI ran. PyTorch comes first,
pinned by the lock (set FLASHKV_TORCH to choose another spec, for example "torch==2.13.0+cpu"
with a CPU index; the lock's torch line is then left out). Extra arguments after ``test`` go to
pytest, after ``lab`` to JupyterLab. As root (a container, a cloud VM) JupyterLab is started with
--allow-root, and run.py says so. A .venv left without pip is repaired with ensurepip, or created
afresh. Every environment run.py sets up gets the project's JupyterLab setting defaults
(flashkv_edu/jupyterlab/flashkv_edu.json: widget messages on the kernel's main thread).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK = ROOT / "constraints.txt"
VENVS = {
    "locked": ROOT / ".venv",
    "latest": ROOT / ".venv-latest",
    "oldest": ROOT / ".venv-oldest",
    "hosted": ROOT / ".venv-hosted",
}
# The hosted lane mimics a hosted runtime with its own PyTorch and an older Triton (Colab's GPU
# image pins triton 3.6): `run.py hosted` must leave both alone, and these tests (no kernel of the
# package runs there) must pass.
HOSTED_PREINSTALLED = ("triton==3.6.0",)
HOSTED_TESTS = (
    "tests/test_reference.py",
    "tests/test_online_softmax.py",
    "tests/test_cache_and_model.py",
    "tests/test_window_cache.py",
    "tests/test_torch_backend.py",
    "tests/test_hf.py",
    "tests/test_runtime.py::test_a_triton_older_than_the_kernels_need_leaves_the_pytorch_paths",
)
OLDEST = ("torch", "triton", "transformers")  # installed at their lowest allowed release by the lane "oldest"
EXTRAS = ("dev", "hf", "site")
# The Python versions the lock is resolved for (CI runs 3.11); every one has a torch wheel.
LOCK_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
# JupyterLab setting defaults: widget (comm) messages are handled on the kernel's main thread, so
# a slider's redraw never runs on a subshell thread at the same time as a cell's matplotlib code
# (matplotlib is not thread-safe; README, "Widgets and kernel subshells").
LAB_SETTINGS = ROOT / "flashkv_edu" / "jupyterlab" / "flashkv_edu.json"
QUIET = ("--quiet", "--disable-pip-version-check")


def bin_dir(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts" if os.name == "nt" else "bin")


def python_in(venv_dir: Path) -> Path:
    return bin_dir(venv_dir) / ("python.exe" if os.name == "nt" else "python")


def sh(*cmd: str | Path, env: dict[str, str] | None = None) -> None:
    """Run ``cmd`` in the repository root (echoed first); ``env``: variables added to ours."""
    print("+", " ".join(f"{k}={v}" for k, v in (env or {}).items()), *(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, env={**os.environ, **(env or {})})


def has_pip(python: Path) -> bool:
    """Whether ``python -m pip`` works in that interpreter."""
    return subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True).returncode == 0


def ensure_pip(venv_dir: Path, python: Path) -> None:
    """Give a virtual environment without pip its pip back: ensurepip first (offline, the
    wheel ships with Python), else a fresh environment in the same place."""
    if has_pip(python):
        return
    print(f"{venv_dir} has no working pip: repairing it with ensurepip", flush=True)
    if subprocess.run([str(python), "-m", "ensurepip", "--upgrade"], capture_output=True).returncode == 0 and has_pip(
        python
    ):
        return
    print(f"ensurepip failed: creating {venv_dir} afresh", flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)


# --- the lock ------------------------------------------------------------------------------------


def read_lock(path: Path = LOCK) -> list[tuple[str, str, str]]:
    """The lock's pins as ``(name, version, marker)`` (marker "" when it applies everywhere)."""
    pins = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        name, _, version = spec.strip().partition("==")
        pins.append((name.strip(), version.strip(), marker.strip()))
    return pins


def locked_torch(path: Path = LOCK) -> str:
    """The lock's torch requirement, e.g. ``torch==2.13.0``."""
    versions = {v for name, v, _ in read_lock(path) if name == "torch"}
    if len(versions) != 1:
        raise SystemExit(
            f"{path.name} must pin torch exactly once (found {sorted(versions)}): run `python3 run.py lock`"
        )
    return f"torch=={versions.pop()}"


def constraints_for(torch_spec: str, workdir: Path, drop: tuple[str, ...] = ()) -> Path:
    """The lock; or a copy without the packages in ``drop`` and, when FLASHKV_TORCH asks for
    another torch, without torch."""
    drop = tuple(canonical(n) for n in drop) + (() if torch_spec == locked_torch() else ("torch",))
    if not drop:
        return LOCK
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / "constraints-adjusted.txt"
    kept = [line for line in LOCK.read_text().splitlines() if canonical(line.split("==")[0].strip()) not in drop]
    copy.write_text("\n".join(kept) + "\n")
    return copy


def lowest_pins() -> list[str]:
    """``name==X`` for each package of OLDEST, X the lower bound of its range in pyproject.toml."""
    pins = []
    for req in project_requirements():
        name = canonical(re.split(r"[<>=!~;\[ ]", req)[0])
        if name in OLDEST:
            low = re.search(r">=\s*([\w.]+)", req)
            if not low:
                raise SystemExit(f"pyproject.toml gives {name} no lower bound (>=): {req!r}")
            pins.append(f"{name}=={low.group(1)}")
    return pins


def install_commands(python: Path, torch_spec: str, lane: str, constraints: Path | None = None) -> list[list]:
    """The pip commands that set a lane's environment up. "locked": torch first, then the package
    with its extras, both ``-c constraints.txt``. "oldest": the same, the packages of OLDEST at
    their lowest allowed release. "latest": the newest releases pyproject allows (``--upgrade
    --upgrade-strategy eager``), torch as given."""
    package = f".[{','.join(EXTRAS)}]"
    pip = [python, "-m", "pip", "install", *QUIET]
    if lane == "latest":  # constraints: torch alone, so that the eager upgrade leaves it as pinned
        hold = ["-c", constraints] if constraints else []
        return [[*pip, torch_spec], [*pip, *hold, "--upgrade", "--upgrade-strategy", "eager", "-e", package]]
    lock = ["-c", constraints or LOCK]
    extra = lowest_pins() if lane == "oldest" else []
    # torch first, so that the package's own "torch>=..." is already satisfied and pip does not
    # pull a multi-GB CUDA build on a CPU-only machine.
    return [[*pip, *lock, torch_spec], [*pip, *lock, "-e", package, *extra]]


def install_lab_settings(prefix: Path) -> Path:
    """Put :data:`LAB_SETTINGS` into the JupyterLab of the environment at ``prefix``.

    JupyterLab reads ``<prefix>/share/jupyter/lab/settings/overrides.d/*.json`` as defaults (a
    user's own choice in the settings editor still wins); the file is named after the project, so
    no other package's overrides are touched. Returns the path written."""
    target = prefix / "share" / "jupyter" / "lab" / "settings" / "overrides.d" / LAB_SETTINGS.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != LAB_SETTINGS.read_bytes():
        shutil.copyfile(LAB_SETTINGS, target)
    return target


def setup(lane: str = "locked") -> Path:
    """Create or refresh the lane's virtual environment; return its Python."""
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by an older Python
        sys.exit("flashkv_edu needs Python >= 3.11 (Triton 3.9 ships wheels for 3.11 and newer)")
    venv_dir = VENVS[lane]
    python = python_in(venv_dir)
    if not python.exists():
        print(f"creating {venv_dir}", flush=True)
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    oldest_torch = next((p for p in lowest_pins() if p.startswith("torch==")), None) if lane == "oldest" else None
    torch_spec = os.environ.get("FLASHKV_TORCH") or oldest_torch or locked_torch()
    py_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if lane != "latest" and py_version not in LOCK_PYTHONS:
        print(f"note: constraints.txt is resolved for Python {', '.join(LOCK_PYTHONS)}, not {py_version}", flush=True)
    install_lab_settings(venv_dir)
    stamp = venv_dir / ".flashkv_setup"
    wanted = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + LOCK.read_bytes() + torch_spec.encode() + lane.encode()
    ).hexdigest()
    if lane != "latest" and stamp.exists() and stamp.read_text() == wanted:
        return python  # the lane "latest" always looks for new releases
    ensure_pip(venv_dir, python)
    if lane == "latest":
        constraints = venv_dir / "constraints-torch.txt"
        constraints.write_text(torch_spec + "\n")
    else:
        # The oldest torch has its own pins (setuptools<82 for torch 2.12): the lock's setuptools goes too.
        constraints = constraints_for(torch_spec, venv_dir, (*OLDEST, "setuptools") if lane == "oldest" else ())
    for cmd in install_commands(python, torch_spec, lane, constraints):
        sh(*cmd)
    if lane == "latest":
        report_drift(python)
    stamp.write_text(wanted)
    return python


def installed_versions(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--exclude-editable", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def report_drift(python: Path) -> None:
    """Print what the upgrade lane installed that differs from the lock."""
    py = subprocess.run(
        [str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    locked = {}
    for name, version, marker in read_lock():
        if not marker or marker == f'python_version == "{py}"':
            locked[canonical(name)] = version
    changed = [
        f"{name} {locked[name]} -> {version}"
        for name, version in sorted(installed_versions(python).items())
        if name in locked and locked[name] != version.split("+")[0]
    ]
    print("newer than constraints.txt: " + (", ".join(changed) if changed else "nothing"), flush=True)


def project_requirements(extras: tuple[str, ...] = EXTRAS) -> list[str]:
    """pyproject.toml's dependencies and the extras run.py installs (or ``extras``)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


def resolve(python_version: str, requirements: list[str], workdir: Path) -> dict[str, dict]:
    """What pip installs for ``requirements`` on Linux under ``python_version`` today (a dry-run
    resolution from wheels): ``{name: metadata}`` (``version``, ``requires_dist``, ...)."""
    report = workdir / f"report-{python_version}.json"
    cmd = [sys.executable, "-m", "pip", "install", *QUIET, "--dry-run", "--ignore-installed"]
    cmd += ["--python-version", python_version, "--only-binary=:all:", "--target", str(workdir / "target")]
    cmd += ["--report", str(report), *requirements]
    print(f"+ resolving for Python {python_version}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    items = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"] for i in items}


def resolve_all(torch_spec: str, workdir: Path) -> dict[str, dict[str, str]]:
    """``{python: {name: version}}`` for every Python of LOCK_PYTHONS. The torch build run.py
    installs (the CPU build where one is on the index, as on the machine CI runs on) is resolved
    with the first Python; the others get torch's own dependencies as that build declares them
    (the CUDA build on PyPI pins another Triton and several GB of CUDA libraries)."""
    requirements = [r for r in project_requirements() if canonical(re.split(r"[<>=!~;\[ ]", r)[0]) != "torch"]
    first = resolve(LOCK_PYTHONS[0], [torch_spec, *requirements], workdir)
    torch_deps = [d for d in first["torch"].get("requires_dist") or [] if "extra ==" not in d]
    if any(canonical(re.split(r"[<>=!~;\[ ]", d)[0]) == "triton" for d in torch_deps):
        raise SystemExit(
            f"{torch_spec} resolved to a CUDA build (it pins its own Triton); lock with torch's CPU build "
            "reachable, e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu"
        )
    out = {LOCK_PYTHONS[0]: {n: m["version"] for n, m in first.items()}}
    for py in LOCK_PYTHONS[1:]:
        versions = {n: m["version"] for n, m in resolve(py, [*torch_deps, *requirements], workdir).items()}
        versions["torch"] = out[LOCK_PYTHONS[0]]["torch"]
        out[py] = versions
    for versions in out.values():
        versions["torch"] = versions["torch"].split("+")[0]  # the lock pins the public version
    return out


def lock_text(resolved: dict[str, dict[str, str]], torch_spec: str, today: str) -> str:
    """constraints.txt from per-Python resolutions: one line per package where every Python
    gets the same version, else one line per Python with a ``python_version`` marker."""
    lines = [
        "# The lock: exact versions of everything run.py installs (transitive dependencies included),",
        "# resolved from pyproject.toml's ranges (dependencies + the extras "
        + " and ".join(EXTRAS)
        + ") and "
        + torch_spec
        + ",",
        f"# for Linux wheels of Python {', '.join(resolved)}, on {today}. CI tests Python 3.11.",
        "# Made by `python3 run.py lock`; do not edit by hand. run.py installs with `pip install -c constraints.txt`.",
    ]
    names = sorted({n for versions in resolved.values() for n in versions})
    for name in names:
        per_python = {py: versions.get(name) for py, versions in resolved.items()}
        if len(set(per_python.values())) == 1:
            lines.append(f"{name}=={per_python[next(iter(per_python))]}")
            continue
        for py, version in per_python.items():
            if version is not None:
                lines.append(f'{name}=={version} ; python_version == "{py}"')
    return "\n".join(lines) + "\n"


def lock() -> int:
    """Refresh constraints.txt: resolve pyproject's ranges (torch as locked, or FLASHKV_TORCH)
    for every Python of LOCK_PYTHONS."""
    torch_spec = os.environ.get("FLASHKV_TORCH") or (locked_torch() if LOCK.exists() else "torch==2.13.0")
    with tempfile.TemporaryDirectory() as tmp:
        resolved = resolve_all(torch_spec, Path(tmp))
    LOCK.write_text(lock_text(resolved, torch_spec, datetime.date.today().isoformat()))
    print(f"wrote {LOCK.name}: {sum(1 for _ in read_lock())} pins; now run `python3 run.py test`", flush=True)
    return 0


# --- hosted runtimes (Colab and the like) -------------------------------------------------------

MIN_TRITON = (3, 7)  # flashkv_edu.runtime.MIN_TRITON: the oldest Triton the kernels pass with


def installed(python: Path, module: str) -> str | None:
    """The version of ``module`` importable by ``python``, or None."""
    code = f"import importlib.metadata as m\ntry: print(m.version({module!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True).stdout.strip()
    return out or None


def hosted(python: Path = Path(sys.executable)) -> list[str]:
    """Install flashkv_edu into ``python``'s environment (a hosted runtime: Colab's, a cluster's)
    **next to the torch and Triton it has**: torch only when it is missing (the lock's), Triton only
    when it is missing on Linux, the package without its dependencies, and the rest of its
    requirements as pyproject.toml ranges with torch and Triton held where they are. Returns the
    lines it reports (what was kept, what was installed, which parts need Linux or a newer Triton)."""
    report = []
    pip = [str(python), "-m", "pip", "install", *QUIET]
    torch_version = installed(python, "torch")
    if torch_version is None:
        sh(*pip, os.environ.get("FLASHKV_TORCH") or locked_torch())
        torch_version = installed(python, "torch")
        report.append(f"torch {torch_version}: installed (none was there)")
    else:
        report.append(f"torch {torch_version}: kept as it was")
    triton_version = installed(python, "triton")
    linux = sys.platform.startswith("linux")
    if triton_version is None and linux:
        lock_triton = next((f"triton=={v}" for name, v, _ in read_lock() if name == "triton"), "triton")
        sh(*pip, lock_triton, f"torch=={torch_version}")
        triton_version = installed(python, "triton")
        report.append(f"triton {triton_version}: installed (none was there)")
    elif triton_version is not None:
        report.append(f"triton {triton_version}: kept as it was")
    hold = [f"torch=={torch_version}"] + ([f"triton=={triton_version}"] if triton_version else [])
    requirements = [
        r for r in project_requirements(("hf",)) if canonical(re.split(r"[<>=!~;\[ ]", r)[0]) not in ("torch", "triton")
    ]
    with tempfile.TemporaryDirectory() as tmp:
        held = Path(tmp) / "hold.txt"
        held.write_text("\n".join(hold) + "\n")
        sh(*pip, "-c", held, *requirements)
        sh(*pip, "--no-deps", "-e", ROOT)
    if not linux:
        report.append("Triton has Linux wheels only: the kernels of notebooks 05-07 and 09 need Linux; the rest runs")
    elif triton_version is None or tuple(int(x) for x in triton_version.split("+")[0].split(".")[:2]) < MIN_TRITON:
        report.append(
            f"triton {triton_version} is older than {'.'.join(map(str, MIN_TRITON))}: the Triton kernels are off "
            "(notebooks 05-07 and 09's kernel cells say so); every PyTorch part runs"
        )
    else:
        report.append("everything runs: the Triton kernels through the interpreter on a CPU, compiled on a GPU")
    for line in report:
        print(line, flush=True)
    return report


def setup_hosted() -> Path:
    """The hosted lane's environment: torch as locked and an older Triton installed first, as a
    hosted runtime has them, then ``run.py hosted``; both must come out unchanged."""
    venv_dir = VENVS["hosted"]
    python = python_in(venv_dir)
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(venv_dir)
    ensure_pip(venv_dir, python)
    torch_spec = os.environ.get("FLASHKV_TORCH") or locked_torch()
    sh(python, "-m", "pip", "install", *QUIET, torch_spec, *HOSTED_PREINSTALLED)
    before = {m: installed(python, m) for m in ("torch", "triton")}
    sh(python, ROOT / "run.py", "hosted")
    after = {m: installed(python, m) for m in ("torch", "triton")}
    if after != before:
        raise SystemExit(f"run.py hosted changed the preinstalled packages: {before} -> {after}")
    sh(python, "-m", "pip", "install", *QUIET, "-c", LOCK, "pytest", "hypothesis")
    print(f"hosted lane: torch {after['torch']} and triton {after['triton']} left as they were", flush=True)
    return python


# --- the course website ----------------------------------------------------------------------------

SITE_SOURCE = ROOT / "build" / "site-src"
SITE = ROOT / "build" / "site"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_NOTE = (
    "*Interactive in JupyterLab: this is the widget's stored picture at its default settings. Run the "
    "notebook (`python3 run.py lab`) to move its controls.*"
)
SITE_CONF = """\
# Written by `python3 run.py site`; edit run.py, not this file.
project = "flashkv_edu"
author = "flashkv_edu"
extensions = ["myst_nb", "sphinx-mathjax-offline"]  # MathJax from the package: no remote script
nb_execution_mode = "off"  # the notebooks' stored outputs, as CI produced them
nb_ipywidgets_js = {}  # no widget JavaScript from a CDN: widget cells carry their stored picture
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
html_theme = "furo"
html_title = "flashkv_edu: FlashAttention's KV cache, step by step"
html_static_path = []
exclude_patterns = ["_build"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]
"""


def notebook_titles(notebooks: Path) -> dict[str, str]:
    """``{stem: title}`` of every notebook, the title being its first heading."""
    titles = {}
    for path in sorted(notebooks.glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        first = "".join(cells[0]["source"]).splitlines()[0] if cells else path.stem
        titles[path.stem] = first.lstrip("# ").strip() or path.stem
    return titles


def widget_pictures(nb: dict, model_id: str) -> list[dict]:
    """The stored outputs (pictures) under a widget: the Output widgets among its descendants."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    found, todo, seen = [], [model_id], set()
    while todo:
        mid = todo.pop(0)
        if mid in seen or mid not in state:
            continue
        seen.add(mid)
        model = state[mid]
        found += [o for o in model.get("state", {}).get("outputs", []) if "image/png" in o.get("data", {})]
        for child in model.get("state", {}).get("children", []):
            todo.append(child.removeprefix("IPY_MODEL_"))
    return found


def link_notebooks(text: str, titles: dict[str, str]) -> str:
    """Turn "notebook 04" in prose into a link to its page (not inside code or an existing link)."""
    by_number = {stem[:2]: stem for stem in titles}
    parts = re.split(r"(`[^`]*`|\[[^\]]*\]\([^)]*\))", text)
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(
            r"\b([Nn]otebooks?) (\d\d)\b",
            lambda m: (
                f"[{m.group(1)} {m.group(2)}]({by_number[m.group(2)]}.ipynb)" if m.group(2) in by_number else m.group(0)
            ),
            parts[i],
        )
    return "".join(parts)


def site_notebook(path: Path, titles: dict[str, str]) -> dict:
    """A notebook as its page shows it: widget cells carry their stored pictures and a note that
    they are live in JupyterLab, widget state dropped, "notebook NN" linked."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = link_notebooks("".join(cell["source"]), titles)
            continue
        outputs = []
        for out in cell.get("outputs", []):
            view = out.get("data", {}).get(WIDGET_VIEW)
            if view is None:
                outputs.append(out)
                continue
            note = {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": WIDGET_NOTE}}
            outputs += [note, *widget_pictures(nb, view["model_id"])]
        cell["outputs"] = outputs
    nb.get("metadata", {}).pop("widgets", None)
    return nb


def site_index(titles: dict[str, str]) -> str:
    """The front page: the README (what the course is, the notebook map, the exercise list, the
    instructors' guide) with the notebooks linked, then the table of contents in chain order."""
    readme = (ROOT / "README.md").read_text()
    for stem, title in titles.items():
        readme = readme.replace(f"`{stem}.ipynb`", f"[{title}]({stem}.ipynb)")
    readme = link_notebooks(readme, titles).replace("](notebooks/images/", "](images/")
    toc = "\n".join(titles)
    return f"{readme}\n\n```{{toctree}}\n:caption: The notebooks\n:maxdepth: 1\n:hidden:\n\n{toc}\n```\n"


def build_site(out: Path = SITE, source: Path = SITE_SOURCE) -> Path:
    """Build the website into ``out`` from the notebooks' stored outputs (nothing is executed, no
    network is used). Runs in the environment that has the ``site`` extra (``run.py site``)."""
    from sphinx.cmd.build import build_main

    notebooks = ROOT / "notebooks"
    titles = notebook_titles(notebooks)
    shutil.rmtree(source, ignore_errors=True)
    source.mkdir(parents=True)
    for stem in titles:
        (source / f"{stem}.ipynb").write_text(json.dumps(site_notebook(notebooks / f"{stem}.ipynb", titles)))
    if (notebooks / "images").is_dir():
        shutil.copytree(notebooks / "images", source / "images")
    (source / "index.md").write_text(site_index(titles))
    (source / "conf.py").write_text(SITE_CONF)
    shutil.rmtree(out, ignore_errors=True)
    code = build_main(["-q", "-b", "html", str(source), str(out)])
    if code:
        raise SystemExit(f"sphinx-build failed ({code})")
    (out / ".nojekyll").touch()  # GitHub Pages: serve the _static folder as it is
    return out


# --- commands ------------------------------------------------------------------------------------


def lab_arguments(extra: list[str], euid: int | None) -> list[str]:
    """JupyterLab's arguments: the notebooks folder, ``--allow-root`` when running as root
    (JupyterLab refuses to start there otherwise), then the caller's own."""
    args = ["--notebook-dir", str(ROOT / "notebooks")]
    if euid == 0 and "--allow-root" not in extra:
        print("running as root (a container or cloud VM?): starting JupyterLab with --allow-root", flush=True)
        args.append("--allow-root")
    return args + extra


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("lab", "test", "lock", "lab-settings", "site", "build-site", "hosted"):
        print(__doc__)
        return 2
    if argv[0] == "lock":
        return lock()
    if argv[0] == "lab-settings":
        print(f"wrote {install_lab_settings(Path(sys.prefix))}")
        return 0
    if argv[0] == "hosted":
        hosted()
        return 0
    if argv[0] == "build-site":  # the step of `site` that runs inside the environment
        print(f"built the course website in {build_site()}", flush=True)
        return 0
    if argv[0] == "site":
        python = setup("locked")
        sh(python, Path(__file__).resolve(), "build-site")
        print(f"open {SITE / 'index.html'}, or serve it: python3 -m http.server -d {SITE.relative_to(ROOT)}")
        return 0
    if argv[0] == "lab":
        python = setup("locked")
        euid = os.geteuid() if hasattr(os, "geteuid") else None
        sh(python.parent / "jupyter", "lab", *lab_arguments(argv[1:], euid))
        return 0
    args = argv[1:]
    lanes = [a[2:] for a in args if a in ("--latest", "--oldest", "--hosted")]
    if len(lanes) > 1:
        print("choose one of --latest, --oldest and --hosted")
        return 2
    lane = lanes[0] if lanes else "locked"
    args = [a for a in args if a not in ("--latest", "--oldest", "--hosted")]
    if lane == "hosted":
        python = setup_hosted()
        sh(python, "-m", "pytest", "-o", "addopts=-p no:cacheprovider", *(args or (*HOSTED_TESTS, "-k", "not triton")))
        return 0
    python = setup(lane)
    cpus = os.cpu_count() or 1
    arguments = parallel_arguments(args, cpus)
    sh(python, "-m", "pytest", *arguments, env=worker_threads(arguments, cpus, os.environ))
    return 0


def parallel_arguments(args: list[str], cpus: int) -> list[str]:
    """pytest's arguments for the test command: the caller's, plus (unless they choose ``-n``
    themselves or ask for one test file's worth) one worker per core up to 2, each notebook's cells
    kept together on one worker in order (``--dist loadfile``, which nbval needs; tests/conftest.py
    shares out the solved copies one by one), and the 10 slowest tests printed at the end."""
    extra = []
    chosen = "no:xdist" in args or any(a.startswith(("-n", "--numprocesses", "--dist")) for a in args)
    if not chosen and cpus > 1:
        extra += ["-n", str(min(2, cpus)), "--dist", "loadfile"]
    if not any(a.startswith("--durations") for a in args):
        extra.append("--durations=10")
    return [*extra, *args]


def worker_threads(arguments: list[str], cpus: int, environ) -> dict[str, str]:
    """The thread count each pytest worker (and each notebook kernel it starts) may use: the cores
    shared out between the ``-n`` workers. Two workers on two cores that each start two OpenMP
    threads fight over the cores and busy-wait: a notebook cell measured 1.3 s alone took 4-5 s
    beside a second such process. A thread count the caller set is kept; one worker: nothing set."""
    if "OMP_NUM_THREADS" in environ or "-n" not in arguments:
        return {}
    workers = int(arguments[arguments.index("-n") + 1])
    return {"OMP_NUM_THREADS": str(max(1, cpus // max(1, workers)))}


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
