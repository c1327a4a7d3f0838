"""Notebook 05 (tiled Triton kernels): its figure, its widget, and its Triton exercises.

All four exercises are ``@triton.jit`` code run through Triton's interpreter (on a GPU, compiled):
``my_step`` (the inner loop of the prefill kernel), ``my_key_range`` (the key tiles a query tile
visits, causal and windowed), ``my_copy_tile`` (masked loads and stores at the tails) and
``my_pack_rows`` (how the decode kernel packs a GQA group into the rows of one tile).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import ListedColormap

from flashkv_edu import runtime
from flashkv_edu.reference import attention_mask, attention_ref
from flashkv_edu.runtime import tl, triton

from .exercise import CaseFailed, Exercise, MemoryRecord, expect_close, expect_equal, expect_within, run_check

EXERCISES = [
    Exercise("05", "my_step", "check_inner_loop", 25, triton=True),
    Exercise("05", "my_key_range", "check_key_range", 20, triton=True),
    Exercise("05", "my_copy_tile", "check_copy_tile", 15, triton=True),
    Exercise("05", "my_pack_rows", "check_pack_rows", 10, triton=True),
]

# --- figures ---------------------------------------------------------------------------------


def draw_tile_schedule(
    seqlen_q: int = 256, seqlen_k: int = 256, block_m: int = 32, block_n: int = 32, causal: bool = True, window: int = 0
):
    """Heatmap of :func:`flashkv_edu.kernels.forward.tile_schedule` for causal attention with an
    optional sliding window of ``window`` tokens (0 = none): which (query tile, key tile) pairs
    the forward kernel skips, visits fully visible, or visits partly masked. Returns
    ``(fig, visited, total)`` tile counts."""
    from flashkv_edu.kernels.forward import tile_schedule

    window_size = (window - 1, 0) if window > 0 else (-1, -1)
    sched = tile_schedule(seqlen_q, seqlen_k, block_m, block_n, causal=causal, window_size=window_size)
    visited, total = int((sched > 0).sum()), sched.numel()
    fig, ax = plt.subplots(figsize=(12, 7.5))
    ax.imshow(
        sched.numpy(), cmap=ListedColormap(["#f2f2f2", "#2b6cb0", "#90cdf4"]), vmin=0, vmax=2, interpolation="nearest"
    )
    what = "causal" if causal else "no mask"
    if window:
        what += f", window W={window} = window_size=({window - 1}, 0)"
    ax.set(
        title=f"Tile schedule: {what}\nvisited {visited} of {total} tiles ({visited / total:.0%})",
        xlabel=f"key tile ({block_n} keys)",
        ylabel=f"query tile ({block_m} queries)",
    )
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="#2b6cb0", label="visited, all visible"),
            Patch(color="#90cdf4", label="visited, partly masked"),
            Patch(color="#f2f2f2", label="skipped by loop bounds"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=10,
    )
    fig.tight_layout()
    return fig, visited, total


# --- the IO argument and occupancy ------------------------------------------------------------

#: Per-SM limits of the two targets the compile check builds for (CUDA C Programming Guide,
#: "Technical Specifications per Compute Capability"): 32-bit registers, shared memory usable
#: by resident programs, and resident warps.
SM_LIMITS = {
    "sm_80": dict(gpu="A100", registers=65536, shared_bytes=164 * 1024, warps=64),
    "sm_90": dict(gpu="H100", registers=65536, shared_bytes=228 * 1024, warps=64),
}


def hbm_bytes(n: int, d: int, block_m: int, elem: int = 2, score_elem: int = 4) -> dict:
    """HBM bytes of one attention head over ``n`` queries and ``n`` keys of head dim ``d``.

    ``naive``: read Q and K, write the ``n x n`` scores, read them for the softmax, write the
    probabilities, read them and V, write O (scores and probabilities in fp32,
    ``score_elem`` bytes). ``tiled``: read Q once, read all of K and V once per query tile of
    ``block_m`` rows, write O once; the scores never leave the chip."""
    io = n * d * elem
    naive = 2 * io + 4 * n * n * score_elem + 2 * io
    tiled = io + (n // block_m) * 2 * io + io
    return dict(naive=naive, tiled=tiled)


def occupancy(registers: int, shared_bytes: int, num_warps: int, target: str) -> dict:
    """Programs (CTAs) of one kernel resident on one SM, limited by registers (allocated per
    warp in units of 256, i.e. per thread rounded up to 8), by shared memory and by warps."""
    lim = SM_LIMITS[target]
    regs_per_warp = -(-registers // 8) * 8 * 32
    by_regs = lim["registers"] // (regs_per_warp * num_warps)
    by_shared = lim["shared_bytes"] // shared_bytes if shared_bytes else lim["warps"] // num_warps
    by_warps = lim["warps"] // num_warps
    ctas = min(by_regs, by_shared, by_warps)
    return dict(
        by_registers=by_regs,
        by_shared=by_shared,
        by_warps=by_warps,
        programs=ctas,
        warps=ctas * num_warps,
        occupancy=ctas * num_warps / lim["warps"],
    )


def occupancy_table(rows, dtype: str = "fp16", headdim: int = 128) -> list[dict]:
    """The compile table's rows for one dtype and head dim, with the warps each kernel is
    compiled with and :func:`occupancy` added. Printed as a table too."""
    from flashkv_edu.kernels.gpucheck import variants

    warps = {(v.kernel, v.variant, v.dtype, v.headdim): v.warps for v in variants()}
    out = []
    print(
        f"{'kernel':<22} {'variant':<22} {'target':<6} {'regs':>4} {'warps':>5} {'shared':>7} "
        f"{'by regs':>7} {'by smem':>7} {'programs/SM':>11} {'occupancy':>9}"
    )
    for r in rows:
        if r["dtype"] != dtype or r["headdim"] != headdim:
            continue
        w = warps[(r["kernel"], r["variant"], r["dtype"], r["headdim"])]
        occ = occupancy(r["registers"], r["shared_bytes"], w, r["target"])
        out.append(dict(r, num_warps=w, **occ))
        print(
            f"{r['kernel']:<22} {r['variant']:<22} {r['target']:<6} {r['registers']:>4} {w:>5} "
            f"{r['shared_bytes'] // 1024:>5}KB {occ['by_registers']:>7} {occ['by_shared']:>7} "
            f"{occ['programs']:>11} {occ['occupancy']:>9.0%}"
        )
    return out


def tile_schedule_explorer():
    """A widget over sequence length, tile sizes, causal and window for :func:`draw_tile_schedule`."""
    import ipywidgets as widgets

    def redraw(seqlen, block, causal, window):
        draw_tile_schedule(seqlen, seqlen, block, block, causal, window)
        plt.show()

    return widgets.interactive(
        redraw,
        seqlen=widgets.IntSlider(value=256, min=32, max=1024, step=32, description="seqlen"),
        block=widgets.Dropdown(options=[16, 32, 64, 128], value=32, description="tile size"),
        causal=widgets.Checkbox(value=True, description="causal"),
        window=widgets.IntSlider(value=0, min=0, max=512, step=16, description="window W"),
    )


# --- notebook 06: paged KV cache -------------------------------------------------------------


if runtime.HAS_TRITON:
    # --- solutions (the learner writes functions of the same names) ------------------------------

    @triton.jit
    def my_step(
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
        """One key tile of the online softmax: returns the new ``(m_i, l_i, acc)``."""
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        return m_new, l_i, acc

    @triton.jit
    def my_key_range(
        pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
    ):
        """``(lo, hi)``: the key range query tile ``pid_m`` must visit; ``lo`` a multiple of
        ``BLOCK_N``. Windows use -1 for infinite; causal is ``window_right = 0``."""
        lo = 0
        hi = seqlen_k
        if window_right >= 0:
            hi = tl.minimum(seqlen_k, pid_m * BLOCK_M + BLOCK_M - 1 + seqlen_k - seqlen_q + window_right + 1)
        if window_left >= 0:
            lo = tl.maximum(0, pid_m * BLOCK_M + seqlen_k - seqlen_q - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
        return lo, hi

    @triton.jit
    def my_copy_tile(X, Y, n_rows, n_cols, stride_x, stride_y, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program ``(i, j)`` copies tile ``(i, j)`` of the ``(n_rows, n_cols)`` matrix ``X``
        (row stride ``stride_x``) into ``Y``; nothing outside the matrix is read or written."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=inside, other=0.0)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], x, mask=inside)

    @triton.jit
    def my_pack_rows(r, kv_head, GROUP: tl.constexpr):
        """Row ``r`` of a decode tile is query token ``r // GROUP`` of query head
        ``kv_head * GROUP + r % GROUP``: returns ``(token, head)``."""
        return r // GROUP, kv_head * GROUP + r % GROUP

    # --- harness kernels ---------------------------------------------------------------------------

    @triton.jit
    def _key_range_harness(
        LO,
        HI,
        seqlen_q,
        seqlen_k,
        window_left,
        window_right,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FN: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        lo, hi = FN(pid_m, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N)
        tl.store(LO + pid_m, (lo + pid_m * 0).to(tl.int32))
        tl.store(HI + pid_m, (hi + pid_m * 0).to(tl.int32))

    @triton.jit
    def _step_harness(
        Q, K, V, MASK, O, seqlen_q, seqlen_k, headdim, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, FN: tl.constexpr,
    ):  # fmt: skip
        """Attention of one head through the step ``FN`` with an arbitrary visibility ``MASK``
        (int8 ``(seqlen_q, seqlen_k)``): tiles where some rows see nothing, rows that never do."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < seqlen_q
        dim_ok = dims < headdim
        q = tl.load(Q + rows[:, None] * headdim + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, seqlen_k, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < seqlen_k
            kv = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + cols[:, None] * headdim + dims[None, :], mask=kv, other=0.0)
            v = tl.load(V + cols[:, None] * headdim + dims[None, :], mask=kv, other=0.0)
            ok = row_ok[:, None] & col_ok[None, :]
            visible = tl.load(MASK + rows[:, None] * seqlen_k + cols[None, :], mask=ok, other=0) != 0
            bias = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            m_i, l_i, acc = FN(q, k, v, m_i, l_i, acc, visible, bias, scale, 1.0, False, False, True)
        empty = l_i == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
        tl.store(O + rows[:, None] * headdim + dims[None, :], out, mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _pack_harness(TOK, HEAD, kv_head, BLOCK: tl.constexpr, GROUP: tl.constexpr, FN: tl.constexpr):
        r = tl.arange(0, BLOCK)
        tok, head = FN(r, kv_head, GROUP)
        tl.store(TOK + r, (tok + r * 0).to(tl.int32))
        tl.store(HEAD + r, (head + r * 0).to(tl.int32))


def _dots_without_ieee(step) -> int:
    """How many ``tl.dot`` calls in ``step``'s source lack ``input_precision="ieee"``: on a GPU
    those multiply fp32 tiles in TF32 (a 10-bit mantissa), which the interpreter cannot show."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(getattr(step, "fn", step))))
    except (OSError, TypeError, SyntaxError):
        return 0  # no source to read (the check then relies on the numbers alone)
    missing = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "dot":
            kw = {k.arg: k.value for k in node.keywords}
            value = kw.get("input_precision")
            if not (isinstance(value, ast.Constant) and value.value == "ieee"):
                missing += 1
    return missing


def check_inner_loop(step) -> bool | None:
    """``step`` as the inner loop of ``simple_attention_kernel`` on ragged shapes, then inside a
    harness with masks that hide whole tiles from some rows (and every key from others); its
    ``tl.dot`` calls on these fp32 tiles must ask for ``input_precision="ieee"``."""
    from flashkv_edu.kernels.forward import simple_attention

    gen = torch.Generator().manual_seed(5)

    def case(sq, sk, d):
        def run(f):
            q, k, v = (torch.randn(n, d, generator=gen) * 2 for n in (sq, sk, sk))
            want = attention_ref(q[None, :, None], k[None, :, None], v[None, :, None])[0, :, 0]
            expect_close("output", want, simple_attention(q, k, v, f), atol=1e-4)

        return f"seqlen_q={sq}, seqlen_k={sk}, headdim={d}", run

    def masked(label, sq, sk, d, mask):
        def run(f):
            q, k, v = (torch.randn(n, d, generator=gen) * 2 for n in (sq, sk, sk))
            out = torch.empty(sq, d)
            _step_harness[(triton.cdiv(sq, 16),)](
                q, k, v, mask.to(torch.int8).contiguous(), out, sq, sk, d, d**-0.5, BLOCK_M=16, BLOCK_N=16,
                BLOCK_D=max(16, triton.next_power_of_2(d)), FN=f,
            )  # fmt: skip
            z = (q @ k.T * d**-0.5).masked_fill(~mask, float("-inf"))
            p = torch.where(mask.any(1, keepdim=True), torch.softmax(z, -1), torch.zeros_like(z)).nan_to_num()
            expect_close("output (rows that see no key give 0)", p @ v, out, atol=1e-4)

        return f"{label}: seqlen_q={sq}, seqlen_k={sk}", run

    def ieee(f):
        if _dots_without_ieee(f):
            raise CaseFailed(
                'a tl.dot without input_precision="ieee": on a GPU it multiplies these fp32 tiles in TF32 '
                "(10-bit mantissa); the interpreter cannot show it, the source does"
            )

    window = attention_mask(40, 40, window_size=(5, 0))
    late = attention_mask(20, 40, causal=True)
    late[3] = False  # a row that sees nothing at all
    holes = torch.rand(24, 48, generator=gen) < 0.3
    holes[:, 16:32] = False  # a key tile nobody sees
    holes[5] = False
    return run_check(
        "check_inner_loop",
        step,
        [
            case(1, 7, 16),
            case(20, 45, 32),
            case(33, 16, 20),
            masked("a sliding window (whole tiles hidden from a row)", 40, 40, 32, window),
            masked("causal, one row sees nothing", 20, 40, 16, late),
            masked("random holes and a key tile nobody sees", 24, 48, 16, holes),
            ("the source: tl.dot precision", ieee),
        ],
        "ragged shapes and masked tiles match attention_ref within 1e-4; fp32 dots in IEEE precision",
    )


def check_key_range(fn) -> bool | None:
    """Every key a row of the tile can see lies in ``[lo, hi)``, ``lo`` is a multiple of
    ``BLOCK_N``, and no visited key tile is hidden from every row of the query tile."""

    def case(sq, sk, bm, bn, window):
        def run(f):
            tiles = triton.cdiv(sq, bm)
            lo, hi = torch.zeros(tiles, dtype=torch.int32), torch.zeros(tiles, dtype=torch.int32)
            _key_range_harness[(tiles,)](lo, hi, sq, sk, window[0], window[1], BLOCK_M=bm, BLOCK_N=bn, FN=f)
            mask = attention_mask(sq, sk, window_size=window)
            for m in range(tiles):
                a, b = int(lo[m]), int(hi[m])
                where = f"query tile {m} (rows {m * bm}..{min(sq, (m + 1) * bm) - 1})"
                if a % bn:
                    raise CaseFailed(f"{where}: lo={a} is not a multiple of BLOCK_N={bn}")
                if a < 0:
                    raise CaseFailed(f"{where}: lo={a} is negative: the loop would load keys before the first one")
                if b > sk:
                    raise CaseFailed(f"{where}: hi={b} is past the last key (seqlen_k={sk})")
                seen = mask[m * bm : (m + 1) * bm].any(0).nonzero().flatten()
                if seen.numel() and (int(seen.min()) < a or int(seen.max()) >= b):
                    raise CaseFailed(
                        f"{where}: keys {int(seen.min())}..{int(seen.max())} are visible, "
                        f"but the range [{a}, {b}) leaves some out"
                    )
                for t in range(a, b, bn):
                    if not bool(mask[m * bm : (m + 1) * bm, t : t + bn].any()):
                        raise CaseFailed(
                            f"{where}: [{a}, {b}) visits key tile {t}..{t + bn - 1}, which no row of the tile can see"
                        )

        return f"seqlen_q={sq}, seqlen_k={sk}, tiles {bm}x{bn}, window_size={window}", run

    cases = [
        case(70, 70, 16, 16, (-1, 0)),
        case(5, 40, 16, 16, (-1, 0)),
        case(64, 64, 16, 16, (8, 0)),
        case(20, 50, 16, 8, (3, 2)),
        case(10, 33, 16, 16, (-1, -1)),
        case(40, 10, 16, 16, (-1, 0)),
        case(20, 20, 16, 16, (0, 0)),
        case(33, 40, 16, 8, (0, 3)),
        case(40, 10, 16, 16, (2, 0)),
        case(50, 64, 16, 16, (4, -1)),
    ]
    return run_check(
        "check_key_range",
        fn,
        cases,
        "causal, windows down to one token, empty rows: no key missed, no hidden tile, bounds in range",
    )


def check_copy_tile(fn) -> bool | None:
    """Copy matrices whose sizes are not multiples of the tile through ``fn``, into a ``Y`` with
    another row stride: the copy must be exact, and nothing outside the matrix may be read (loads
    are recorded by the interpreter) or written (sentinels around ``Y``)."""

    def case(n_rows, n_cols, br, bc):
        def run(f):
            src = torch.full((n_rows + br, n_cols + bc), 999.0)
            src[:n_rows, :n_cols] = torch.arange(n_rows * n_cols, dtype=torch.float32).view(n_rows, n_cols)
            dst = torch.full((n_rows + br, n_cols + bc + 8), -1.0)  # a guard band, and a row stride of its own
            with MemoryRecord() as mem:
                f[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))](
                    src, dst, n_rows, n_cols, src.stride(0), dst.stride(0), BLOCK_R=br, BLOCK_C=bc
                )
            inside_x = torch.zeros(src.shape, dtype=torch.bool)
            inside_x[:n_rows, :n_cols] = True
            expect_within("X", mem, "loads", src, inside_x)
            if mem.available and mem.strays("loads", [src]):
                raise CaseFailed("a load read memory outside X altogether: mask the loads")
            expect_equal("the copied matrix", src[:n_rows, :n_cols], dst[:n_rows, :n_cols])
            outside = dst.clone()
            outside[:n_rows, :n_cols] = -1.0
            if not bool((outside == -1.0).all()):
                r, c = (outside != -1.0).nonzero()[0].tolist()
                raise CaseFailed(
                    f"Y[{r}, {c}] lies outside the {n_rows}x{n_cols} matrix but was written "
                    f"({outside[r, c].item():g}): mask the stores (and address Y with its own stride)"
                )

        return f"a {n_rows}x{n_cols} matrix in {br}x{bc} tiles", run

    return run_check(
        "check_copy_tile",
        fn,
        [case(32, 32, 16, 16), case(37, 19, 16, 16), case(5, 70, 8, 32), case(1, 1, 16, 16), case(17, 16, 16, 16)],
        "exact copies with row and column tails; nothing read or written outside the matrix",
    )


def check_pack_rows(fn) -> bool | None:
    """``fn(r, kv_head, GROUP)`` for a tile of 32 rows against the decode kernel's layout."""

    def case(group, kv_head):
        def run(f):
            tok, head = torch.zeros(32, dtype=torch.int32), torch.zeros(32, dtype=torch.int32)
            _pack_harness[(1,)](tok, head, kv_head, BLOCK=32, GROUP=group, FN=f)
            r = torch.arange(32)
            expect_equal("query token of each row", (r // group).int(), tok)
            expect_equal("query head of each row", (kv_head * group + r % group).int(), head)

        return f"GROUP={group}, kv_head={kv_head}", run

    return run_check(
        "check_pack_rows",
        fn,
        [case(4, 0), case(8, 3), case(1, 2), case(2, 5)],
        "tokens and heads of every row for groups of 1, 2, 4 and 8",
    )
