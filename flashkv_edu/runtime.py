"""Where code runs: device choice, Triton's interpreter, notebook setup and the canary kernel.

This is the one module that reads the environment. Importing it (which ``import flashkv_edu``
does first) decides:

* ``DEVICE``: ``cuda`` when a GPU is visible, else ``cpu``.
* ``INTERPRET``: whether Triton kernels run through Triton's CPU interpreter. Triton reads
  ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a function, so the variable is set here,
  before any kernel module is imported. On a machine without CUDA it defaults to ``1``; an
  explicit ``TRITON_INTERPRET=0`` is respected (the GPU compile check uses that to compile
  kernels on a CPU-only machine).
* ``HAS_TRITON``: whether a Triton the kernels run on is importable (Linux wheels only; at least
  :data:`MIN_TRITON`).
"""

from __future__ import annotations

import os
import random
import sys
import warnings

import torch

from .validation import BACKENDS, check_backend

__all__ = [
    "BACKENDS",
    "DEVICE",
    "HAS_CUDA",
    "HAS_TRITON",
    "INTERPRET",
    "LATE_TRITON_HINT",
    "MIN_TRITON",
    "TRITON_MISSING_HINT",
    "TRITON_TOO_OLD_HINT",
    "TRITON_TOO_LATE",
    "TRITON_VERSION",
    "canary_kernel",
    "describe",
    "require_triton",
    "resolve_backend",
    "run_canary",
    "seed_everything",
    "setup_notebook",
    "tl",
    "triton",
]

HAS_CUDA: bool = torch.cuda.is_available()

_TRITON_ALREADY_IMPORTED = "triton.language" in sys.modules
LATE_TRITON_HINT = (
    "Triton was imported before flashkv_edu on a machine without a GPU (transformers does this), "
    "so Triton's interpreter could not be switched on in time: the PyTorch paths work, the Triton "
    "kernels do not. Import flashkv_edu first (before `import triton` or transformers), or start "
    "Python with TRITON_INTERPRET=1 in the environment."
)
# triton.language has decorated its own helpers (tl.zeros, tl.sum, ...) for a GPU: kernels that
# use them would fail under the interpreter, so the interpreter stays off and backend="triton"
# says why (backend="auto" is PyTorch on a CPU anyway).
TRITON_TOO_LATE: bool = not HAS_CUDA and _TRITON_ALREADY_IMPORTED and "TRITON_INTERPRET" not in os.environ
if TRITON_TOO_LATE:
    warnings.warn(LATE_TRITON_HINT, stacklevel=2)
elif not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Triton warns on every compile unless this is set explicitly; FMA fusion is its default.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE: torch.device = torch.device("cuda" if HAS_CUDA else "cpu")

MIN_TRITON = (3, 7)
"""The oldest Triton the kernels are tested with (``python3 run.py test --oldest``). Older
interpreters cannot run them (Triton 3.6's turns a loop bound loaded from memory into a 1-element
array that numpy 2 refuses as an int); a PyTorch build that pins an older Triton keeps it, and
flashkv_edu then runs its PyTorch paths only."""

try:  # Triton has wheels for Linux only; the rest of the package works without it.
    import triton
    import triton.language as tl

    TRITON_VERSION = triton.__version__
    HAS_TRITON = tuple(int(p) for p in TRITON_VERSION.split("+")[0].split(".")[:2]) >= MIN_TRITON
except ImportError:  # pragma: no cover - exercised on platforms without Triton
    triton = None
    tl = None
    HAS_TRITON = False
    TRITON_VERSION = None

TRITON_MISSING_HINT = (
    "Triton is not installed. It ships wheels for Linux only; on macOS or Windows run the "
    "Triton notebooks on Linux (a VM, WSL2, Binder or Colab). Every PyTorch part still works."
)
TRITON_TOO_OLD_HINT = (
    f"Triton {TRITON_VERSION} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest release "
    "flashkv_edu's kernels are tested with: the Triton kernels are off, every PyTorch part works. "
    f"pip install 'triton>={'.'.join(map(str, MIN_TRITON))}' (or a PyTorch whose Triton is that recent)."
)


def require_triton() -> None:
    """Raise ``RuntimeError`` with an install hint when Triton is unavailable (or too old)."""
    if not HAS_TRITON:
        raise RuntimeError(TRITON_MISSING_HINT if TRITON_VERSION is None else TRITON_TOO_OLD_HINT)


def resolve_backend(backend, device) -> str:
    """What ``backend=`` means for tensors on ``device``: ``"triton"`` or ``"torch"``.

    ``"auto"`` is the fastest correct path: compiled Triton kernels for CUDA tensors, PyTorch
    everywhere else (Triton's interpreter is exact but hundreds of times slower, so it runs
    only when asked for with ``"triton"``, as the kernel notebooks do).
    """
    check_backend(backend)
    on_cuda = torch.device(device).type == "cuda"
    if backend == "auto":
        return "triton" if (HAS_TRITON and on_cuda and not INTERPRET) else "torch"
    if backend == "triton":
        require_triton()
        if TRITON_TOO_LATE:
            raise RuntimeError(LATE_TRITON_HINT)
        if not INTERPRET and not on_cuda:
            from .validation import ArgumentError

            raise ArgumentError(
                "backend='triton' needs CUDA tensors, or Triton's interpreter "
                "(this process compiles kernels without running them)"
            )
    return backend


def describe() -> str:
    """One line saying where kernels run, e.g. ``device=cpu, Triton interpreter on``."""
    if not HAS_TRITON:
        mode = (
            "Triton missing (PyTorch paths only)"
            if TRITON_VERSION is None
            else (f"Triton {TRITON_VERSION} too old for the kernels (PyTorch paths only)")
        )
    elif INTERPRET:
        mode = "Triton interpreter on"
    else:
        mode = "Triton compiled for the GPU"
    return f"device={DEVICE.type}, {mode}"


if HAS_TRITON:

    @triton.jit
    def canary_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask)
        tl.store(y_ptr + offs, 2.0 * x + 1.0, mask=mask)


def run_canary() -> bool:
    """Run a two-line Triton kernel (``y = 2x + 1`` over 37 values, 3 programs) and check it.

    Returns True only when the kernel ran and its result is exact; False when it could not run
    (Triton missing, or a compile-only process without a GPU). Raises ``RuntimeError`` with a
    fix hint when the kernel runs but computes the wrong numbers, the known failure mode of
    mismatched triton / torch / numpy versions under the interpreter.
    """
    if not HAS_TRITON or (not INTERPRET and not HAS_CUDA):
        return False
    x = torch.arange(37, dtype=torch.float32, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    canary_kernel[(3,)](x, y, x.numel(), BLOCK=16)
    if not torch.equal(y, 2 * x + 1):
        raise RuntimeError(
            "The Triton canary kernel computed wrong numbers (expected y = 2x + 1). Triton's "
            "interpreter breaks when triton, torch and numpy versions drift apart. Fix: "
            "reinstall the pinned versions with `python3 run.py test` (or "
            "`pip install -e .[dev]` in a fresh virtual environment)."
        )
    return True


def seed_everything(seed: int = 0) -> None:
    """Seed Python's, NumPy's and PyTorch's random generators."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_notebook(seed: int = 0) -> None:
    """Prepare a notebook: seeds, plotting style, quiet warnings, canary check.

    Prints one verdict line about the environment, the same on every CPU run so that nbval can
    compare it.
    """
    seed_everything(seed)
    torch.set_printoptions(precision=4, sci_mode=False)
    warnings.filterwarnings("ignore", category=UserWarning, module="triton")
    try:
        import matplotlib

        # Pictures that read at 100% zoom in JupyterLab: 10-inch figures at 100 dpi are 1000 px
        # wide, and no text is smaller than 10 points.
        matplotlib.rcParams.update(
            {
                "figure.figsize": (10.0, 4.0),
                "figure.dpi": 100,
                "figure.autolayout": True,  # tight layout: the picture fills its 10 inches
                "axes.grid": False,
                "font.size": 11,
                "axes.titlesize": 12,
                "axes.labelsize": 11,
                "xtick.labelsize": 10,
                "ytick.labelsize": 10,
                "legend.fontsize": 10,
            }
        )
    except ImportError:  # pragma: no cover
        pass
    if not HAS_TRITON:
        canary = TRITON_MISSING_HINT if TRITON_VERSION is None else TRITON_TOO_OLD_HINT
    else:
        canary = "canary kernel ok" if run_canary() else "canary kernel not run (no GPU and no interpreter)"
    print(f"environment ready: {describe()}; {canary}")
