"""Compile every Triton kernel of the package for NVIDIA GPUs, without a GPU.

    python -m flashkv_edu.kernels.gpucheck            # compile all, print the resource table
    python -m flashkv_edu.kernels.gpucheck --json F   # also write the table as JSON

Each kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90,
32))`` for representative settings (fp16 and bf16, head dims 64 and 128). Registers and spills
(``STACK``/``LOCAL`` bytes) are read from the cubin with the ``cuobjdump`` that ships with
Triton; shared memory comes from the compiled kernel's metadata. The GPU-only rules that the
interpreter does not enforce (``tl.dot`` tiles of at least 16, power-of-two ranges) fail here.

This needs Triton with the interpreter **off**; when started in an interpreting process it
re-runs itself in a subprocess with ``TRITON_INTERPRET=0``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import runtime
from ..cli import file_to_write, int_in

__all__ = [
    "CONTIGUOUS",
    "DECODE_PTRS",
    "DTYPES",
    "FWD_PTRS",
    "HEADDIMS",
    "PAGED_SPLIT",
    "TABLE",
    "TABLE_PATH",
    "TARGETS",
    "CompileResult",
    "Variant",
    "compile_all",
    "excerpt",
    "format_table",
    "variants",
]

TARGETS = (80, 90)
DTYPES = ("fp16", "bf16")
HEADDIMS = (64, 128)
TABLE_PATH = Path(__file__).with_name("gpucheck_table.json")


@dataclass
class CompileResult:
    kernel: str
    variant: str
    dtype: str
    headdim: int
    target: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma: str
    ok: bool
    error: str = ""
    triton: str = ""  # the Triton release that compiled it


@dataclass(frozen=True)
class Variant:
    """One kernel compiled with one setting: its pointer types (``T`` = the data dtype), the
    arguments that are floats (the rest are i32), its constexprs and warps."""

    kernel: str
    variant: str
    fn: object
    ptrs: dict
    floats: tuple
    consts: dict
    warps: int
    dtype: str
    headdim: int
    targets: tuple = TARGETS


FWD_PTRS = dict(Q="T", K="T", V="T", O="T", LSE="fp32", SLOPES="fp32", SEQLENS_K="i32", LEFTPAD_K="i32", TILES="i32")
DECODE_PTRS = dict(
    Q="T", K="T", V="T", O="T", LSE="fp32", SEQLENS="i32", LEFTPAD="i32", BATCH_IDX="i32", BLOCK_TABLE="i32",
    SLOPES="fp32", SINKS="fp32", TILES="i32", K_SCALE="fp32", V_SCALE="fp32",
)  # fmt: skip
PAGED_SPLIT = dict(PAGED=True, SPLIT=True, HAS_BATCH_IDX=False)
CONTIGUOUS = dict(PAGED=False, SPLIT=False, HAS_BATCH_IDX=True)

# (kernel, variant, pointer types changed from the kernel's, constexprs changed, head dims, targets).
# Triton has no fp8 e4m3 type before sm_89: there the kernel reads the cache as bytes and decodes
# them in software ("fp8 as bytes"), on sm_90 it reads fp8 directly.
TABLE = (
    ("attention_fwd_kernel", "softcap, window, GQA 4", {}, dict(HAS_SOFTCAP=True), HEADDIMS, TARGETS),
    ("attention_fwd_kernel", "ALiBi, window, GQA 4", {}, dict(HAS_ALIBI=True), HEADDIMS, TARGETS),
    ("decode_kernel", "contiguous, GQA 8", {}, CONTIGUOUS, HEADDIMS, TARGETS),
    ("decode_kernel", "paged + split, GQA 8", dict(O="fp32"), PAGED_SPLIT, HEADDIMS, TARGETS),
    ("decode_kernel", "ALiBi + softcap, paged", dict(O="fp32"), dict(PAGED_SPLIT, HAS_ALIBI=True, HAS_SOFTCAP=True),
     HEADDIMS, TARGETS),
    ("decode_kernel", "sinks, paged + split", dict(O="fp32"), dict(PAGED_SPLIT, HAS_SINK=True), HEADDIMS, TARGETS),
    ("decode_kernel", "chunk, contiguous", {}, dict(CONTIGUOUS, HAS_CHUNK=True), (64, 128), TARGETS),
    ("decode_kernel", "fp8 cache, descales", dict(K="fp8e4nv", V="fp8e4nv"), dict(CONTIGUOUS, KV_SCALE=1), (128,),
     (90,)),
    ("decode_kernel", "fp8 as bytes, descales", dict(K="u8", V="u8"), dict(CONTIGUOUS, KV_SCALE=1, FP8_BITS=True),
     (128,), (80,)),
    ("decode_kernel", "int8 paged, token scales", dict(K="i8", V="i8", K_SCALE="fp16", V_SCALE="fp16", O="fp32"),
     dict(PAGED_SPLIT, KV_SCALE=2), (128,), TARGETS),
    ("combine_kernel", "up to 128 splits", {}, {}, HEADDIMS, TARGETS),
)  # fmt: skip


def _kernel_defaults(kernel: str, d: int) -> tuple[object, dict, tuple, dict, int]:
    """(jit function, pointer types, float arguments, constexprs, warps) of ``kernel`` at head dim ``d``."""
    from .combine import combine_kernel
    from .common import decode_block_n, default_blocks, default_warps
    from .decode import decode_kernel
    from .forward import attention_fwd_kernel

    bm, bn = default_blocks(d, interpreting=False)
    if kernel == "attention_fwd_kernel":
        consts = dict(GROUP=4, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, HAS_SOFTCAP=False, HAS_ALIBI=False, DOT_FP32=False)
        return attention_fwd_kernel, FWD_PTRS, ("scale", "softcap"), consts, default_warps(d)
    if kernel == "decode_kernel":
        consts = dict(
            GROUP=8, BLOCK_M=16, BLOCK_N=decode_block_n(d, interpreting=False), BLOCK_D=d, HAS_LEFTPAD=True,
            HAS_SOFTCAP=False, HAS_ALIBI=False, DOT_FP32=False, KV_SCALE=0, FP8_BITS=False,
        )  # fmt: skip
        return decode_kernel, DECODE_PTRS, ("scale", "softcap"), consts, default_warps(d)
    ptrs = dict(OACC="fp32", LACC="fp32", O="T", LSE="fp32")
    return combine_kernel, ptrs, (), dict(BLOCK_S=128, BLOCK_D=d), 4


def variants() -> list[Variant]:
    """Every kernel and setting that is compiled: :data:`TABLE` for each dtype and head dim, the
    teaching kernel of notebook 05 and the runtime's canary."""
    from .common import online_softmax_step
    from .forward import simple_attention_kernel

    out = []
    for dtype in DTYPES:
        for d in HEADDIMS:
            for kernel, variant, ptrs, consts, headdims, targets in TABLE:
                if d in headdims:
                    fn, base_ptrs, floats, base_consts, warps = _kernel_defaults(kernel, d)
                    out.append(
                        Variant(
                            kernel,
                            variant,
                            fn,
                            {**base_ptrs, **ptrs},
                            floats,
                            {**base_consts, **consts},
                            warps,
                            dtype,
                            d,
                            targets,
                        )  # fmt: skip
                    )
    teaching = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=64, STEP=online_softmax_step)
    fp32 = dict(Q="fp32", K="fp32", V="fp32", O="fp32")
    out.append(Variant("simple_attention_kernel", "teaching version", simple_attention_kernel, fp32, ("scale",),
                       teaching, 4, "fp32", 64))  # fmt: skip
    out.append(Variant("canary_kernel", "fp32", runtime.canary_kernel, dict(x_ptr="fp32", y_ptr="fp32"), (),
                       dict(BLOCK=16), 1, "fp32", 0))  # fmt: skip
    return out


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) from ``cuobjdump --dump-resource-usage``."""
    tool = Path(runtime.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    stack = int(re.search(r"STACK:(\d+)", text).group(1))
    local = int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, stack + local


def _compile(index: int, target: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = variants()[index]
    fn, ptrs, floats, consts, dtype = v.fn, v.ptrs, v.floats, v.consts, v.dtype
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + (dtype if ptrs[arg] == "T" else ptrs[arg])
        elif arg in floats:
            sig[arg] = "fp32"
        else:
            sig[arg] = "i32"
    return runtime.triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts),
        target=GPUTarget("cuda", target, 32),
        options={"num_warps": v.warps, "num_stages": 2},
    )


def _compile_one(index: int, target: int) -> CompileResult:
    v = variants()[index]
    label = dict(kernel=v.kernel, variant=v.variant, dtype=v.dtype, headdim=v.headdim, target=f"sm_{target}")
    label["triton"] = runtime.TRITON_VERSION
    try:
        compiled = _compile(index, target)
        regs, spills = _resource_usage(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
        return CompileResult(
            **label, registers=regs, spill_bytes=spills, shared_bytes=compiled.metadata.shared, mma=mma, ok=True
        )
    except Exception as exc:  # report every failure in the table
        return CompileResult(
            **label,
            registers=0,
            spill_bytes=0,
            shared_bytes=0,
            mma="",
            ok=False,
            error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
        )


def compile_all(workers: int = 2) -> list[CompileResult]:
    """Compile every kernel variant for each of its targets; returns one result per compile."""
    jobs = [(i, t) for i, v in enumerate(variants()) for t in v.targets]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, *zip(*jobs, strict=True)))


def excerpt(kernel: str = "attention_fwd_kernel", dtype: str = "fp16", headdim: int = 64, lines: int = 2) -> str:
    """Compile one kernel for sm_80 and sm_90 and return the first matrix-multiply lines of its
    PTX and SASS (``mma.sync`` / ``wgmma`` in PTX, ``HMMA`` / ``HGMMA`` in SASS)."""
    index = next(i for i, v in enumerate(variants()) if (v.kernel, v.dtype, v.headdim) == (kernel, dtype, headdim))
    tool = Path(runtime.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = []
    for target in TARGETS:
        compiled = _compile(index, target)
        ptx = [ln.strip() for ln in compiled.asm["ptx"].splitlines() if "mma" in ln and not ln.strip().startswith("//")]
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout
        sass = [
            re.sub(r"\s+", " ", re.sub(r"^/\*[0-9a-f]+\*/", "", ln.strip()).split(";")[0]).strip() + " ;"
            for ln in sass.splitlines()
            if "MMA" in ln
        ]
        text.append(f"sm_{target}: {len(ptx)} PTX mma instructions, {len(sass)} SASS MMA instructions")
        text += [f"  PTX  {ln[:110]}" for ln in ptx[:lines]] + [f"  SASS {ln[:110]}" for ln in sass[:lines]]
    return "\n".join(text)


def format_table(rows) -> str:
    """The results as an aligned text table."""
    head = (
        f"{'kernel':<22} {'variant':<22} {'dtype':<5} {'d':>4} {'target':<6} {'regs':>5} {'spills':>7} "
        f"{'shared':>8} {'mma':<9} ok"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        r = r if isinstance(r, dict) else asdict(r)
        lines.append(
            f"{r['kernel']:<22} {r['variant']:<22} {r['dtype']:<5} {r['headdim']:>4} {r['target']:<6} "
            f"{r['registers']:>5} {r['spill_bytes']:>7} {r['shared_bytes']:>8} {r['mma']:<9} "
            f"{'yes' if r['ok'] else 'NO: ' + r['error']}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashkv_edu.kernels.gpucheck",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=file_to_write, help="also write the table to this JSON file")
    parser.add_argument("--workers", type=int_in(1, 64), default=2)
    parser.add_argument(
        "--excerpt",
        metavar="KERNEL",
        choices=["attention_fwd_kernel", "decode_kernel", "combine_kernel"],
        help="print PTX/SASS matrix-multiply lines of one kernel",
    )
    args = parser.parse_args(argv)
    runtime.require_triton()
    if runtime.INTERPRET:  # compiling needs real JIT functions: re-run without the interpreter
        env = dict(os.environ, TRITON_INTERPRET="0")
        return subprocess.run(
            [sys.executable, "-m", "flashkv_edu.kernels.gpucheck", *(argv or sys.argv[1:])], env=env
        ).returncode
    if args.excerpt:
        print(excerpt(args.excerpt))
        return 0
    start = time.perf_counter()
    rows = compile_all(args.workers)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(
        f"\n{len(rows) - len(failed)}/{len(rows)} compiled for sm_80 and sm_90 "
        f"in {time.perf_counter() - start:.0f} s; spills in {sum(r.spill_bytes > 0 for r in rows)} configs"
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
