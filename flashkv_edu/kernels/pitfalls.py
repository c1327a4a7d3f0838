"""Three small kernels that show what Triton's CPU interpreter does not catch (notebook 05).

* :func:`bf16_dot_kernel`: ``tl.dot`` on bf16 tiles. The interpreter stores bf16 as uint16 and
  multiplies the bit patterns, so without an upcast the numbers are wrong (a GPU is right).
* :func:`copy_kernel`: a load without a mask reads past the end of a tensor. The interpreter
  does not complain; on a GPU this is undefined behaviour.
* :func:`tiny_dot_kernel`: ``tl.dot`` on 8 x 8 tiles runs under the interpreter, but GPUs need
  at least 16 in every dimension: compiling it for sm_80 fails.

    python -m flashkv_edu.kernels.pitfalls compile-tiny-dot   # compile for sm_80, print the verdict
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from .. import runtime
from ..runtime import tl, triton

__all__ = [
    "bf16_dot",
    "bf16_dot_kernel",
    "compile_tiny_dot",
    "copy_kernel",
    "tiny_dot_kernel",
]

if runtime.HAS_TRITON:

    @triton.jit
    def bf16_dot_kernel(A, B, C, UPCAST: tl.constexpr):
        """C = A @ B for one 16 x 16 tile, optionally upcasting to fp32 first."""
        r = tl.arange(0, 16)
        a = tl.load(A + r[:, None] * 16 + r[None, :])
        b = tl.load(B + r[:, None] * 16 + r[None, :])
        if UPCAST:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            c = tl.dot(a, b)
        tl.store(C + r[:, None] * 16 + r[None, :], c)

    @triton.jit
    def copy_kernel(X, Y, n, BLOCK: tl.constexpr, MASKED: tl.constexpr):
        """Copy ``BLOCK`` values of X to Y; without ``MASKED`` it ignores ``n``."""
        offs = tl.arange(0, BLOCK)
        if MASKED:
            x = tl.load(X + offs, mask=offs < n, other=0.0)
        else:
            x = tl.load(X + offs)
        tl.store(Y + offs, x)

    @triton.jit
    def tiny_dot_kernel(A, B, C):
        """An 8 x 8 ``tl.dot``: fine for the interpreter, rejected by GPU compilers."""
        r = tl.arange(0, 8)
        c = tl.dot(tl.load(A + r[:, None] * 8 + r[None, :]), tl.load(B + r[:, None] * 8 + r[None, :]))
        tl.store(C + r[:, None] * 8 + r[None, :], c)


def bf16_dot(a: torch.Tensor, b: torch.Tensor, upcast: bool) -> torch.Tensor:
    """16 x 16 bf16 matmul through :func:`bf16_dot_kernel` (fp32 result)."""
    c = torch.empty(16, 16, dtype=torch.float32)
    bf16_dot_kernel[(1,)](a.contiguous(), b.contiguous(), c, UPCAST=upcast)
    return c


def compile_tiny_dot(target: int = 80) -> str:
    """Compile :func:`tiny_dot_kernel` for ``sm_<target>`` in a process without the
    interpreter; returns ``"compiled"`` or the compiler's first error line."""
    if runtime.INTERPRET:
        env = dict(os.environ, TRITON_INTERPRET="0")
        run = subprocess.run(
            [sys.executable, "-m", "flashkv_edu.kernels.pitfalls", "compile-tiny-dot"],
            env=env,
            capture_output=True,
            text=True,
        )
        return run.stdout.strip()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=tiny_dot_kernel, signature={"A": "*fp16", "B": "*fp16", "C": "*fp32"}, constexprs={})
    try:
        triton.compile(src, target=GPUTarget("cuda", target, 32))
        return "compiled"
    except Exception as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "16" in ln and ("dot" in ln.lower() or ">=" in ln)]
        return f"{type(exc).__name__}: {lines[0] if lines else str(exc).splitlines()[0]}"


if __name__ == "__main__":
    if sys.argv[1:] == ["compile-tiny-dot"]:
        print(compile_tiny_dot())
    else:
        sys.exit(__doc__)
