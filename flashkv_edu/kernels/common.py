"""Pieces shared by every Triton kernel: the online-softmax tile step and launch helpers.

Rules these kernels follow (Triton's CPU interpreter does not check them, GPUs do):
``tl.arange`` sizes are powers of two, every ``tl.dot`` tile is at least 16 in each dimension,
every load and store is masked at the tails. Under the interpreter bf16 arithmetic is wrong
(bf16 is stored as uint16 there), so kernels upcast tiles to fp32 before ``tl.dot`` when
``DOT_FP32`` is set: always when interpreting, and for fp32 inputs on a GPU.
"""

from __future__ import annotations

import torch

from .. import runtime
from ..call import MAX_HEADDIM as CALL_MAX_HEADDIM
from ..runtime import tl, triton

__all__ = [
    "MAX_HEADDIM",
    "SCALE_NONE",
    "SCALE_PER_HEAD",
    "SCALE_PER_TOKEN",
    "SUPPORTED_DTYPES",
    "block_d",
    "check_row_offsets",
    "decode_block_n",
    "default_blocks",
    "default_warps",
    "dot_in_fp32",
    "e4m3_to_float",
    "key_range_kernel",
    "next_pow2",
    "online_softmax_step",
    "output_dtype",
    "tanh_softcap",
    "visible_key_range",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = CALL_MAX_HEADDIM["triton"]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, (int(n) - 1).bit_length())


def block_d(headdim: int) -> int:
    """Padded head-dim tile: a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_pow2(headdim))


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel stores its output in. Under the interpreter a bf16 output is stored
    in fp32 and rounded to bf16 by PyTorch afterwards: Triton 3.9's interpreter truncates on
    fp32 -> bf16 casts, where a GPU (and PyTorch) rounds to nearest even."""
    return torch.float32 if (runtime.INTERPRET and dtype == torch.bfloat16) else dtype


def check_row_offsets(name: str, t: torch.Tensor) -> None:
    """The kernels add 32-bit offsets to a 64-bit base pointer per batch row (or page): the
    elements one row ``t[i]`` spans must stay below 2^31."""
    from ..validation import ArgumentError

    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
    if span >= 2**31:
        raise ArgumentError(
            f"{name}[i] spans {span + 1} elements; the kernels address one sequence (or page) "
            "with 32-bit offsets, so it must stay below 2^31"
        )


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles are upcast to fp32 before ``tl.dot``: under the interpreter (bf16 is
    wrong there) and for fp32 inputs (exact IEEE products instead of TF32)."""
    return runtime.INTERPRET or dtype == torch.float32


def default_blocks(headdim: int, interpreting: bool | None = None) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` of the forward kernel: 32 x 32 under the interpreter (few, cheap
    numpy tiles); on a GPU, tiles that keep q, k, v and the accumulator in registers and shared
    memory without spilling for head dims up to 256 (checked by the GPU compile check)."""
    interpreting = runtime.INTERPRET if interpreting is None else interpreting
    if interpreting:
        return 32, 32
    if headdim <= 64:
        return 64, 64
    if headdim <= 128:
        return 64, 32
    return 32, 32


def decode_block_n(headdim: int, interpreting: bool | None = None) -> int:
    """Key-tile width of the decode kernel."""
    interpreting = runtime.INTERPRET if interpreting is None else interpreting
    if interpreting:
        return 32
    return 64 if headdim <= 64 else 32


def default_warps(headdim: int) -> int:
    """Warps per program on a GPU: 4 up to head dim 64, else 8."""
    return 4 if headdim <= 64 else 8


if runtime.HAS_TRITON:
    from ..validation import SCALE_NONE as _NONE
    from ..validation import SCALE_PER_HEAD as _PER_HEAD
    from ..validation import SCALE_PER_TOKEN as _PER_TOKEN

    # The decode kernel's scale modes (``KV_SCALE``), named for use inside kernels.
    SCALE_NONE = tl.constexpr(_NONE)
    SCALE_PER_HEAD = tl.constexpr(_PER_HEAD)
    SCALE_PER_TOKEN = tl.constexpr(_PER_TOKEN)

    @triton.jit
    def tanh_softcap(s, softcap):
        """``softcap * tanh(s / softcap)`` from exponentials (libdevice is not available in
        the interpreter); exact limits +-softcap for huge |s|."""
        x = s / softcap
        return softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))

    @triton.jit
    def e4m3_to_float(bits):
        """float8 e4m3 (``torch.float8_e4m3fn``) bit patterns, loaded as uint8, to fp32 in
        software: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
        (``m * 2^-9``), ``S.1111.111`` is NaN. For GPUs without fp8 conversion (sm_80)."""
        b = bits.to(tl.int32)
        e = (b >> 3) & 15
        m = (b & 7).to(tl.float32)
        val = tl.where(e == 0, m * 0.001953125, (1.0 + m * 0.125) * tl.exp2((e - 7).to(tl.float32)))
        val = tl.where((e == 15) & ((b & 7) == 7), float("nan"), val)
        return tl.where((b & 128) != 0, -val, val)

    @triton.jit
    def visible_key_range(first, last, sk, seqlen_q, window_left, window_right, BLOCK_N: tl.constexpr):
        """The loop bounds of every kernel: ``[lo, hi)``, the keys that some query row ``first ..
        last`` can see among ``sk`` valid keys, with bottom-right masks (row ``i`` on the diagonal
        ``i + sk - seqlen_q``; ``window_left``/``window_right`` -1 for infinite). ``lo`` is rounded
        down to a tile of ``BLOCK_N`` keys, so key tiles that no row sees are never visited."""
        lo = 0
        hi = sk
        if window_right >= 0:
            hi = tl.minimum(sk, last + sk - seqlen_q + window_right + 1)
        if window_left >= 0:
            lo = (tl.maximum(0, first + sk - seqlen_q - window_left) // BLOCK_N) * BLOCK_N
        return lo, hi

    @triton.jit
    def key_range_kernel(LO, HI, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):  # fmt: skip
        """:func:`visible_key_range` of query tile ``program_id(0)`` (rows ``m * BLOCK_M ..
        m * BLOCK_M + BLOCK_M - 1``), stored in ``LO[m]`` and ``HI[m]``: what
        :func:`~flashkv_edu.kernels.forward.tile_schedule` draws."""
        m = tl.program_id(0)
        sk = seqlen_k + 0 * m  # a run-time value, as the kernels' loaded lengths are
        lo, hi = visible_key_range(m * BLOCK_M, m * BLOCK_M + BLOCK_M - 1, sk, seqlen_q, window_left, window_right,
                                   BLOCK_N)  # fmt: skip
        tl.store(LO + m, lo)
        tl.store(HI + m, hi)

    @triton.jit
    def online_softmax_step(
        q,
        k,
        v,
        m_i,
        l_i,
        acc,
        visible,
        bias,
        scale,
        softcap,
        HAS_SOFTCAP: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        """One key tile of FlashAttention's loop for a tile of query rows.

        q ``[M, D]``, k and v ``[N, D]``, ``visible`` bool ``[M, N]``, ``bias`` ``[M, N]``
        (ALiBi, ignored unless HAS_BIAS). Running max ``m_i``, running sum ``l_i`` (``[M]``)
        and accumulator ``acc`` (``[M, D]``, fp32) are rescaled by ``exp(m_old - m_new)``.
        """
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_SOFTCAP:
            s = tanh_softcap(s, softcap)
        if HAS_BIAS:
            s = s + bias
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc
