"""Input checks shared by every public function: clear errors that name the argument."""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    """Check that ``t`` is a tensor (of rank ``ndim`` and one of ``dtypes``); return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same(names: Sequence[str], tensors: Sequence[torch.Tensor], what: str = "dtype") -> None:
    """Check that all tensors share one ``dtype`` or ``device`` (``what``)."""
    values = [getattr(t, what) for t in tensors]
    if any(v != values[0] for v in values):
        listed = ", ".join(f"{n}={str(v).replace('torch.', '')}" for n, v in zip(names, values, strict=True))
        raise ValueError(f"{', '.join(names)} must share one {what}; got {listed}")


def check_window(window_size) -> tuple[int, int]:
    """Check ``window_size = (left, right)``: two ints, each -1 (infinite) or >= 0."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}")
    left, right = window_size
    for side, value in (("left", left), ("right", right)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"window_size {side} must be an int, got {value!r}")
        if value < -1:
            raise ValueError(
                f"window_size {side} must be -1 (infinite) or >= 0, got {value}; "
                "a sliding window of W tokens is window_size=(W-1, 0)"
            )
    return int(left), int(right)


def check_lengths(name: str, lengths, batch: int, *, low: int = 0, high: int | None = None,
                  device=None) -> torch.Tensor:
    """Turn ``lengths`` (int or ``(batch,)`` integer tensor) into an int32 ``(batch,)`` tensor.

    Every value must lie in ``[low, high]`` (``high`` inclusive, when given).
    """
    if isinstance(lengths, bool):
        raise TypeError(f"{name} must be an int or an integer tensor, got bool")
    if isinstance(lengths, int):
        lengths = torch.full((batch,), lengths, dtype=torch.int32, device=device)
    check_tensor(name, lengths, ndim=1)
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32), got {lengths.dtype}")
    if lengths.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if batch and int(lengths.min()) < low:
        raise ValueError(f"{name} must be >= {low}, got {lengths.tolist()}")
    if high is not None and batch and int(lengths.max()) > high:
        raise ValueError(f"{name} must be <= {high}, got {lengths.tolist()}")
    return lengths.to(torch.int32)


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    """Check a finite real number that is > 0 (or >= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return value


def check_block_table(block_table, batch: int, num_blocks: int) -> None:
    """Check a paged-cache ``block_table``: int32 ``(batch, max_blocks)`` with entries in
    ``[0, num_blocks)``."""
    check_tensor("block_table", block_table, ndim=2)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32, got {block_table.dtype}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
    if block_table.numel() and (int(block_table.min()) < 0 or int(block_table.max()) >= num_blocks):
        raise ValueError(f"block_table entries must lie in [0, {num_blocks}) (num_blocks of k_cache)")


def check_alibi_slopes(alibi_slopes, batch: int, nheads: int) -> None:
    """Check ALiBi slopes: fp32 ``(nheads,)`` or ``(batch, nheads)``."""
    check_tensor("alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape ({nheads},) or ({batch}, {nheads}), "
                         f"got {tuple(alibi_slopes.shape)}")


def check_cache_shapes(q, k_cache, v_cache, max_headdim: int = 256) -> None:
    """Check a KV cache against ``q (batch, seqlen_q, nheads, headdim)``: ``k_cache`` and
    ``v_cache`` of one shape, q's head dim (at most ``max_headdim``), ``nheads_k`` dividing
    ``nheads``."""
    h, d = q.shape[2], q.shape[3]
    if d > max_headdim:
        raise ValueError(f"head dim must be <= {max_headdim}, got {d}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache head dim must equal q's ({d}), got {k_cache.shape[3]}")
    hk = k_cache.shape[2]
    if hk == 0 or h % hk:
        raise ValueError(f"nheads_k of k_cache ({hk}) must divide nheads of q ({h})")
