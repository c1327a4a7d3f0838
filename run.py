#!/usr/bin/env python3
"""Set up flashkv_edu in ./.venv and either open JupyterLab or run the whole test suite.

    python3 run.py lab     # set up, then open JupyterLab on notebooks/
    python3 run.py test    # set up, then run unit tests, property tests and nbval

Needs only Python >= 3.10 and pip. PyTorch is installed first, pinned to 2.13.0 (set
FLASHKV_TORCH to choose another spec, for example "torch==2.13.0+cpu" with a CPU index).
Extra arguments after ``test`` go to pytest, after ``lab`` to JupyterLab. As root (a container,
a cloud VM) JupyterLab is started with --allow-root, and run.py says so. A .venv left without
pip is repaired with ensurepip, or created afresh.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".flashkv_setup"


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


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


def setup() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - run.py may be started by an older Python
        sys.exit("flashkv_edu needs Python >= 3.10")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    torch_spec = os.environ.get("FLASHKV_TORCH", "torch==2.13.0")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + torch_spec.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    ensure_pip(VENV, PY)
    quiet = ["--quiet", "--disable-pip-version-check"]
    # torch first, so that the package's own "torch>=..." is already satisfied and pip does not
    # pull a multi-GB CUDA build on a CPU-only machine.
    sh(PY, "-m", "pip", "install", *quiet, torch_spec)
    sh(PY, "-m", "pip", "install", *quiet, "-e", ".[dev,hf]")
    STAMP.write_text(wanted)


def lab_arguments(extra: list[str], euid: int | None) -> list[str]:
    """JupyterLab's arguments: the notebooks folder, ``--allow-root`` when running as root
    (JupyterLab refuses to start there otherwise), then the caller's own."""
    args = ["--notebook-dir", str(ROOT / "notebooks")]
    if euid == 0 and "--allow-root" not in extra:
        print("running as root (a container or cloud VM?): starting JupyterLab with --allow-root", flush=True)
        args.append("--allow-root")
    return args + extra


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("lab", "test"):
        print(__doc__)
        return 2
    setup()
    if argv[0] == "lab":
        euid = os.geteuid() if hasattr(os, "geteuid") else None
        sh(BIN / "jupyter", "lab", *lab_arguments(argv[1:], euid))
    else:
        sh(PY, "-m", "pytest", *argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
