"""The one normaliser of arguments: every public function checks its inputs here.

Each argument rule lives once, here: causal -> window, the default softmax scale, lengths and key
ranges, cache capacity and page size, block tables, ALiBi slopes, sinks, descales, backends, integers.
(Which keys a query sees, once the arguments are normal, is :mod:`flashkv_edu.masks`.) Errors name the
argument and say what was expected. They are :class:`ArgumentError` (a ``ValueError``) or
:class:`ArgumentTypeError` (a ``TypeError``), and both are also ``RuntimeError``, which is what
FlashAttention raises, so ``except RuntimeError`` written for FlashAttention catches them too.

Index tensors come back contiguous (int32 on the right device), so kernels that read them with
plain offsets never depend on the strides of a view the caller passed.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "BACKENDS",
    "check_backend",
    "FLOAT_DTYPES",
    "QUANTIZED_CACHE_DTYPES",
    "SCALE_NONE",
    "SCALE_PER_HEAD",
    "SCALE_PER_TOKEN",
    "ArgumentError",
    "ArgumentTypeError",
    "DeviceChecks",
    "check_alibi_slopes",
    "check_attention_inputs",
    "check_block_table",
    "check_bool",
    "check_cache_descales",
    "check_cache_shapes",
    "check_float_tensor",
    "check_int",
    "check_lengths",
    "check_num_splits",
    "check_positive",
    "check_power_of_two",
    "check_qkv_shapes",
    "check_same",
    "check_sink",
    "check_softcap",
    "check_tensor",
    "check_window",
    "key_range",
    "normalize_window",
    "range_message",
    "skip_value_checks",
    "softmax_scale_for",
    "value_checks_on",
]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value. A ``ValueError``, and a ``RuntimeError`` as in FlashAttention."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype. A ``TypeError``, and a ``RuntimeError``."""


# --- checks that read tensor values: one device-to-host read per call ----------------------------

_VALUE_CHECKS = {"on": True}


@contextlib.contextmanager
def skip_value_checks():
    """Within this block, public calls skip the checks that read tensor **values** (lengths in
    range, block-table entries, finite slopes and scales, ...): they read nothing back from the
    device, as CUDA-graph capture requires. Shapes, dtypes and devices are still checked. Inputs
    are then trusted: out-of-range values give undefined results, as in FlashAttention. The PyTorch
    path reads every row up to the capacity in this mode (it cannot ask how long the sequences are)."""
    before = _VALUE_CHECKS["on"]
    _VALUE_CHECKS["on"] = False
    try:
        yield
    finally:
        _VALUE_CHECKS["on"] = before


def value_checks_on() -> bool:
    """Whether checks that read tensor values run (see :func:`skip_value_checks`)."""
    return _VALUE_CHECKS["on"]


class DeviceChecks:
    """Checks and numbers that need tensor values, gathered so that one call reads the device once.

    :meth:`read` registers a 0-d tensor and returns a handle into the list :meth:`run` returns;
    :meth:`check` a predicate over that list that must hold (else its message becomes an
    :class:`ArgumentError`); :meth:`require` and :meth:`in_range` are the two common checks. :meth:`run`
    stacks every registered tensor and reads them with a single ``tolist()``, then evaluates the
    predicates in order (building a failure's message may read more, only on that error path).
    Inside :func:`skip_value_checks` nothing is read: the handles give their ``default``."""

    def __init__(self):
        self._tensors: list[torch.Tensor] = []
        self._defaults: list[int] = []
        self._checks: list[tuple[Callable[[list], bool], Callable[[], str], type]] = []

    def read(self, value: torch.Tensor, default: int = 0) -> int:
        self._tensors.append(value)
        self._defaults.append(default)
        return len(self._tensors) - 1

    def check(self, holds: Callable[[list], bool], message: Callable[[], str], error: type = None) -> None:
        self._checks.append((holds, message, error or ArgumentError))

    def require(self, ok: torch.Tensor, message: Callable[[], str], error: type = None) -> None:
        """``ok``: a 0-d bool tensor that must be True."""
        i = self.read(ok, 1)
        self.check(lambda v: bool(v[i]), message, error)

    def in_range(self, t: torch.Tensor, low, high, message: Callable[[], str]) -> tuple[int, int]:
        """Every element of the non-empty integer tensor ``t`` lies in ``[low, high]`` (None: no
        bound); one ``aminmax``. Returns the handles of its min and max."""
        lo, hi = torch.aminmax(t)
        i, j = self.read(lo, 0 if low is None else low), self.read(hi, 0 if high is None else high)
        self.check(lambda v: (low is None or v[i] >= low) and (high is None or v[j] <= high), message)
        return i, j

    def run(self) -> list[int]:
        """Raise the first failing check's error, else return the values of :meth:`read`."""
        if not value_checks_on() or not self._tensors:
            return list(self._defaults)
        device = self._tensors[0].device
        values = torch.stack([t.reshape(()).to(device=device, dtype=torch.int64) for t in self._tensors]).tolist()
        for holds, message, error in self._checks:
            if not holds(values):
                raise error(message())
        return values


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    """Check that ``t`` is a tensor (of rank ``ndim`` and one of ``dtypes``); return it."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ArgumentError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(_dtype_name(d) for d in dtypes)
        raise ArgumentTypeError(f"{name} must have dtype in ({allowed}), got {_dtype_name(t.dtype)}")
    return t


def check_float_tensor(name: str, t, *, ndim: int | None = None) -> torch.Tensor:
    """A floating-point tensor (fp16, bf16, fp32 or fp64)."""
    return check_tensor(name, t, ndim=ndim, dtypes=FLOAT_DTYPES)


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str = "dtype") -> None:
    """Check that all tensors share one ``dtype`` or ``device`` (``what``)."""
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        listed = ", ".join(f"{n}={_dtype_name(v)}" for n, v in zip(names, values, strict=True))
        raise ArgumentError(f"{', '.join(names)} must share one {what}; got {listed}")


def check_bool(name: str, value) -> bool:
    """A real ``bool`` (so that ``causal="no"`` is an error, not causal)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (Python or NumPy int, or a 0-d integer tensor; not bool, not float) in
    ``[low, high]``."""
    if (
        isinstance(value, torch.Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
    ):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ArgumentError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ArgumentError(f"{name} must be <= {high}, got {value}")
    return value


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """A finite real number that is > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ArgumentError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_power_of_two(name: str, value, *, low: int = 16) -> int:
    """A tile size: a power of two, at least ``low`` (GPUs need both; the interpreter does not
    check them)."""
    value = check_int(name, value, low=low)
    if value & (value - 1):
        raise ArgumentError(f"{name} must be a power of two >= {low}, got {value}")
    return value


# --- attention arguments ---------------------------------------------------------------------


BACKENDS = ("auto", "triton", "torch")


def check_backend(backend) -> str:
    """``backend=`` is one of :data:`BACKENDS` (what it means on a device: ``runtime.resolve_backend``)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_window(window_size) -> tuple[int, int]:
    """``window_size = (left, right)``: two ints, each -1 (infinite) or >= 0. A tuple, a list or
    a 2-element integer tensor (FlashAttention's tests pass ``torch.randint(0, sk, (2,))``)."""
    if isinstance(window_size, torch.Tensor):
        if window_size.shape != (2,) or window_size.dtype.is_floating_point or window_size.dtype == torch.bool:
            raise ArgumentError(f"window_size must be a pair (left, right) of ints, got {window_size!r}")
        window_size = tuple(int(x) for x in window_size.tolist())
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ArgumentError(f"window_size must be a pair (left, right), got {window_size!r}")
    sides = []
    for side, value in zip(("left", "right"), window_size, strict=True):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ArgumentTypeError(f"window_size {side} must be an int, got {value!r}")
        if value < -1:
            raise ArgumentError(
                f"window_size {side} must be -1 (infinite) or >= 0, got {value}; "
                "a sliding window of W tokens is window_size=(W-1, 0)"
            )
        sides.append(int(value))
    return sides[0], sides[1]


def normalize_window(window_size, causal=False, *, seqlen_k: int | None = None) -> tuple[int, int]:
    """The mask every path applies: ``causal`` sets ``right = 0``. With ``seqlen_k`` (the cache
    capacity) it follows FlashAttention's ``set_params_fprop``: a side ``>= seqlen_k`` becomes -1,
    then a window with a finite left side and an infinite right side gets ``right = seqlen_k``,
    a finite bound (it matters when ``seqlen_q > seqlen_k + 1``: early query rows see nothing)."""
    left, right = check_window(window_size)
    if check_bool("causal", causal):
        right = 0
    if seqlen_k is not None:
        left = -1 if left >= seqlen_k else left
        right = -1 if right >= seqlen_k else right
        if left >= 0 and right < 0:
            right = seqlen_k
    return left, right


def softmax_scale_for(headdim: int, softmax_scale=None) -> float:
    """The logit scale: ``headdim ** -0.5`` by default, else a finite number > 0."""
    if softmax_scale is None:
        return float(headdim) ** -0.5
    return check_positive("softmax_scale", softmax_scale)


def check_softcap(softcap) -> float:
    """``softcap``: 0 (off) or a finite number > 0."""
    return check_positive("softcap", softcap, allow_zero=True)


def _run(checks: DeviceChecks | None, local: DeviceChecks) -> None:
    """Run ``local`` when the caller gave no :class:`DeviceChecks` to gather into."""
    if not checks:
        local.run()


def range_message(name: str, t: torch.Tensor, low, high) -> str:
    values = t.tolist()
    flat = values if t.dim() <= 1 else t.flatten().tolist()
    if low is not None and min(flat) < low:
        return f"{name} must be >= {low}, got {values}"
    return f"{name} must be <= {high}, got {values}"


def check_lengths(
    name: str,
    lengths,
    batch: int,
    *,
    low: int = 0,
    high: int | None = None,
    device=None,
    int32_only: bool = False,
    checks: DeviceChecks | None | bool = None,
) -> torch.Tensor:
    """Turn ``lengths`` (int or ``(batch,)`` integer tensor) into a contiguous int32 ``(batch,)``
    tensor on ``device``. Every value lies in ``[low, high]`` (``high`` inclusive, when given).
    ``int32_only``: a tensor must already be int32 (FlashAttention's rule for its arguments).
    The value checks join ``checks`` when given (read later, together), else run here; with
    ``checks=False`` the caller checks the values itself."""
    if isinstance(lengths, bool):
        raise ArgumentTypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(lengths, numbers.Integral):
        value = int(lengths)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if value < low else f"<= {high}"
            raise ArgumentError(f"{name} must be {bound}, got {value}")
        return torch.full((batch,), value, dtype=torch.int32, device=device)
    check_tensor(name, lengths, ndim=1)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be an integer tensor (int32), got {_dtype_name(lengths.dtype)}")
    if int32_only and lengths.dtype != torch.int32:
        raise ArgumentTypeError(f"{name} must be int32, got {_dtype_name(lengths.dtype)}")
    if lengths.shape[0] != batch:
        raise ArgumentError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if device is not None and lengths.device != torch.device(device):
        raise ArgumentError(f"{name} must be on {torch.device(device)}, got {lengths.device}")
    if checks is False:  # the caller checks the values itself
        return lengths.to(torch.int32).contiguous()
    local = checks or DeviceChecks()
    if batch:
        local.in_range(lengths, low, high, lambda: range_message(name, lengths, low, high))
    _run(checks, local)
    return lengths.to(torch.int32).contiguous()


def key_range(
    seqlens,
    leftpad,
    batch: int,
    capacity: int,
    *,
    device=None,
    names=("seqlens_k", "leftpad_k"),
    int32_only: bool = False,
    checks: DeviceChecks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid key columns ``[start, end)``: ``end = seqlens`` (default ``capacity``),
    ``start = leftpad`` (default 0), ``0 <= start <= end <= capacity``. Returns contiguous int32
    ``(start, end)``, each ``(batch,)``."""
    local = checks or DeviceChecks()
    end = check_lengths(
        names[0],
        capacity if seqlens is None else seqlens,
        batch,
        high=capacity,
        device=device,
        int32_only=int32_only,
        checks=local,
    )
    start = check_lengths(
        names[1], 0 if leftpad is None else leftpad, batch, device=end.device, int32_only=int32_only, checks=local
    )
    local.require(
        (start <= end).all(), lambda: f"{names[1]} must be <= {names[0]}, got {start.tolist()} > {end.tolist()}"
    )
    _run(checks, local)
    return start, end


def check_block_table(block_table, batch: int, num_blocks: int, checks: DeviceChecks | None = None) -> torch.Tensor:
    """A paged-cache ``block_table``: int32 ``(batch, max_blocks)`` with entries in
    ``[0, num_blocks)``. Returned contiguous."""
    check_tensor("block_table", block_table, ndim=2)
    if block_table.dtype != torch.int32:
        raise ArgumentTypeError(f"block_table must be int32, got {_dtype_name(block_table.dtype)}")
    if block_table.shape[0] != batch:
        raise ArgumentError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
    if block_table.shape[1] == 0:
        raise ArgumentError("block_table must have at least one column (max_blocks_per_seq >= 1)")
    local = checks or DeviceChecks()
    local.in_range(
        block_table,
        0,
        num_blocks - 1,
        lambda: f"block_table entries must lie in [0, {num_blocks}) (num_blocks of k_cache)",
    )
    _run(checks, local)
    return block_table.contiguous()


def check_alibi_slopes(alibi_slopes, batch: int, nheads: int, checks: DeviceChecks | None = None) -> torch.Tensor:
    """ALiBi slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``, finite. Returned contiguous."""
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ArgumentError(
            f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), got {tuple(alibi_slopes.shape)}"
        )
    local = checks or DeviceChecks()
    local.require(torch.isfinite(alibi_slopes).all(), lambda: "alibi_slopes must be finite")
    _run(checks, local)
    return alibi_slopes.contiguous()


def check_qkv_shapes(
    q,
    k,
    v,
    *,
    k_name: str = "k",
    v_name: str = "v",
    max_headdim: int | None = None,
    value_headdim_may_differ: bool = False,
) -> None:
    """``q (batch, seqlen_q, nheads, headdim)`` against keys/values ``(batch_k, seqlen_k, nheads_k,
    headdim)`` of one shape (values may have their own head dim when allowed): nonzero heads and
    head dim, ``nheads_k`` dividing ``nheads``."""
    _, _, h, d = q.shape
    if h == 0:
        raise ArgumentError("q must have nheads >= 1, got 0")
    if d == 0:
        raise ArgumentError("q must have headdim >= 1, got 0")
    if max_headdim is not None and d > max_headdim:
        raise ArgumentError(f"headdim of q must be <= {max_headdim}, got {d}")
    same = k.shape[:3] == v.shape[:3] and v.shape[3] > 0 if value_headdim_may_differ else k.shape == v.shape
    if not same:
        what = "agree in (batch, seqlen_k, nheads_k)" if value_headdim_may_differ else "have the same shape"
        raise ArgumentError(f"{k_name} and {v_name} must {what}, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ArgumentError(f"{k_name} head dim must equal q's ({d}), got {k.shape[3]}")
    hk = k.shape[2]
    if hk == 0 or h % hk:
        raise ArgumentError(f"nheads_k of {k_name} ({hk}) must divide nheads of q ({h}) (MHA, GQA or MQA)")


def check_cache_shapes(q, k_cache, v_cache, max_headdim: int = 256) -> None:
    """A KV cache against ``q``: :func:`check_qkv_shapes` with the cache's names (``v_cache`` may
    have its own head dim, FlashAttention 3's ``headdim_v``), head dims at most ``max_headdim``,
    caches contiguous in the last dimension (they are written in place, as FlashAttention
    requires)."""
    check_qkv_shapes(
        q, k_cache, v_cache, k_name="k_cache", v_name="v_cache", max_headdim=max_headdim, value_headdim_may_differ=True
    )
    if v_cache.shape[3] > max_headdim:
        raise ArgumentError(f"headdim of v_cache must be <= {max_headdim}, got {v_cache.shape[3]}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ArgumentError(
            "k_cache and v_cache must be contiguous in the last dimension (they are updated in "
            "place; FlashAttention has the same rule)"
        )


def check_num_splits(num_splits, *, allow_zero: bool = True) -> int:
    """``num_splits``: 0 (heuristic, when allowed) or 1 .. 128."""
    low = 0 if allow_zero else 1
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or not low <= num_splits <= 128:
        what = "0 = heuristic, or 1 .. 128" if allow_zero else "1 .. 128"
        raise ArgumentError(f"num_splits must be an int ({what}), got {num_splits!r}")
    return int(num_splits)


QUANTIZED_CACHE_DTYPES = (torch.float8_e4m3fn, torch.int8)
SCALE_NONE, SCALE_PER_HEAD, SCALE_PER_TOKEN = 0, 1, 2
"""How a cache's stored values become real ones (the decode kernel's ``KV_SCALE``): not at all, times
one descale per (sequence, KV head) (FlashAttention 3's fp8 descales), times one scale per cached
token and KV head (int8)."""


def check_cache_descales(
    q,
    k_cache,
    v_cache,
    k_descale,
    v_descale,
    *,
    batch: int,
    paged: bool,
    per_token: bool = True,
    checks: DeviceChecks | None = None,
) -> int:
    """The cache dtype and its scales, checked together; returns the scale mode.

    * ``SCALE_NONE``: a cache in q's dtype, no scales.
    * ``SCALE_PER_HEAD``: an fp8 e4m3 or int8 cache with ``k_descale``/``v_descale`` fp32
      ``(batch, nheads_k)``, one positive finite factor per sequence and KV head (FlashAttention
      3's descales).
    * ``SCALE_PER_TOKEN`` (``per_token``): an int8 cache with fp32/fp16 scales of the cache's
      shape without the head dim, ``(batch_cache, capacity, nheads_k)`` or paged ``(num_blocks,
      page, nheads_k)``.

    The real value of a cached element is ``stored * scale``.
    """
    check_same(("k_cache", "v_cache"), (k_cache, v_cache), "dtype")
    if (k_descale is None) != (v_descale is None):
        raise ArgumentError("k_descale and v_descale must be given together (both or neither)")
    if k_cache.dtype not in QUANTIZED_CACHE_DTYPES:
        check_same(("q", "k_cache", "v_cache"), (q, k_cache, v_cache), "dtype")
        if k_descale is not None:
            raise ArgumentError(
                f"k_descale/v_descale apply to fp8 e4m3 or int8 caches; k_cache is {_dtype_name(k_cache.dtype)}"
            )
        return SCALE_NONE
    if k_descale is None:
        raise ArgumentError(
            f"a {_dtype_name(k_cache.dtype)} cache needs k_descale and v_descale (real value = stored * descale)"
        )
    hk = k_cache.shape[2]
    mode = None
    local = checks or DeviceChecks()
    for name, t in (("k_descale", k_descale), ("v_descale", v_descale)):
        check_tensor(name, t, dtypes=(torch.float32, torch.float16))
        if t.device != k_cache.device:
            raise ArgumentError(f"{name} must be on the cache's device {k_cache.device}, got {t.device}")
        if t.dim() == 2 and t.dtype == torch.float32 and tuple(t.shape) == (batch, hk):
            this = SCALE_PER_HEAD
            local.require((torch.isfinite(t) & (t > 0)).all(), lambda name=name: f"{name} must be positive and finite")
        elif per_token and k_cache.dtype == torch.int8 and tuple(t.shape) == tuple(k_cache.shape[:3]):
            this = SCALE_PER_TOKEN
            local.require(
                (torch.isfinite(t) & (t >= 0)).all(), lambda name=name: f"{name} must be non-negative and finite"
            )
        else:
            shapes = f"fp32 (batch, nheads_k) = {(batch, hk)}"
            if per_token and k_cache.dtype == torch.int8:
                where = "(num_blocks, page, nheads_k)" if paged else "(batch_cache, capacity, nheads_k)"
                shapes += f", or per token {where} = {tuple(k_cache.shape[:3])}"
            raise ArgumentError(f"{name} must have shape {shapes}; got {_dtype_name(t.dtype)} {tuple(t.shape)}")
        if mode is not None and this != mode:
            raise ArgumentError("k_descale and v_descale must have the same granularity")
        mode = this
    _run(checks, local)
    return mode


def check_attention_inputs(
    q, k, v, alibi_slopes=None, *, max_headdim: int | None = None, value_headdim_may_differ: bool = True
):
    """The shared checks of ``attention_ref``-style entry points: q ``(batch, seqlen_q, nheads,
    headdim)``, k ``(batch, seqlen_k, nheads_k, headdim)`` and v ``(batch, seqlen_k, nheads_k,
    headdim_v)`` floating tensors of one dtype and device, ``nheads_k`` dividing ``nheads``.
    Returns the contiguous ALiBi slopes (or None)."""
    check_float_tensor("q", q, ndim=4)
    check_float_tensor("k", k, ndim=4)
    check_float_tensor("v", v, ndim=4)
    check_same(("q", "k", "v"), (q, k, v), "dtype")
    check_same(("q", "k", "v"), (q, k, v), "device")
    b = q.shape[0]
    if b == 0:
        raise ArgumentError("q must have batch size >= 1, got 0")
    if k.shape[0] != b or v.shape[0] != b:
        raise ArgumentError(f"q, k, v must share the batch size; got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    check_qkv_shapes(q, k, v, max_headdim=max_headdim, value_headdim_may_differ=value_headdim_may_differ)
    if alibi_slopes is None:
        return None
    return check_alibi_slopes(alibi_slopes, b, q.shape[2])


def check_sink(learnable_sink, nheads: int, device, checks: DeviceChecks | None = None) -> torch.Tensor:
    """A learnable sink: one finite logit per query head, ``(nheads,)`` fp32/fp16/bf16 on
    ``device``. Returned fp32 and contiguous."""
    check_tensor("learnable_sink", learnable_sink, ndim=1, dtypes=(torch.float32, torch.float16, torch.bfloat16))
    if tuple(learnable_sink.shape) != (nheads,):
        raise ArgumentError(
            f"learnable_sink must have shape (nheads,) = ({nheads},), got {tuple(learnable_sink.shape)}"
        )
    if learnable_sink.device != torch.device(device):
        raise ArgumentError(f"learnable_sink must be on {torch.device(device)}, got {learnable_sink.device}")
    local = checks or DeviceChecks()
    local.require(torch.isfinite(learnable_sink).all(), lambda: "learnable_sink must be finite")
    _run(checks, local)
    return learnable_sink.float().contiguous()
