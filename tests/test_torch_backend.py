"""The PyTorch backend against the plain oracle: the API grid with the oracle unreachable, both of
its engines (PyTorch's fused attention and its own kernel), rows it must never read, one
device-to-host read per call, and a package whose layers import downwards only."""

from __future__ import annotations

import ast
import contextlib
import random
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import CONFIGS_TORCH, make_config, run_case
from torch.overrides import TorchFunctionMode

import flashkv_edu
from flashkv_edu import flash_attn_with_kvcache, torch_backend
from flashkv_edu.call import check_kvcache_call
from flashkv_edu.reference import attention_mask, attention_ref, naive_attention
from flashkv_edu.validation import skip_value_checks

PACKAGE = Path(flashkv_edu.__file__).parent


@contextlib.contextmanager
def oracle_unreachable():
    """Every function of ``flashkv_edu.reference``, wherever the package holds it, raises."""
    import flashkv_edu.reference as ref

    def raiser(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the backend called the oracle's {name}")

        return fail

    originals = {
        name: fn for name, fn in vars(ref).items() if callable(fn) and getattr(fn, "__module__", "") == ref.__name__
    }
    patched = []
    for module in [m for name, m in sys.modules.items() if name.startswith("flashkv_edu") and m is not None]:
        for attr, value in list(vars(module).items()):
            for name, fn in originals.items():
                if value is fn:
                    patched.append((module, attr, value))
                    setattr(module, attr, raiser(name))
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


@pytest.mark.parametrize("cfg", CONFIGS_TORCH[:45], ids=lambda c: f"{c['mha']}-sq{c['sq']}-S{c['cap']}-d{c['d']}")
def test_the_grid_passes_with_the_oracle_unreachable(cfg):
    """The API grid on backend="torch", the oracle patched to raise during the call: the backend
    is compared with the oracle, never with itself."""
    run_case(cfg, "torch", during_call=oracle_unreachable())


def test_the_patch_would_notice_a_backend_that_calls_the_oracle():
    import flashkv_edu.reference as ref

    with oracle_unreachable(), pytest.raises(AssertionError, match="called the oracle"):
        ref.attention_ref(torch.randn(1, 1, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))


# --- the fused engine: prefill-sized calls ---------------------------------------------------------


@st.composite
def prefill_calls(draw):
    b = draw(st.integers(1, 3))
    h, hk = draw(st.sampled_from([(4, 2), (4, 4), (8, 1)]))
    sq = draw(st.sampled_from([8, 16, 33]))
    cap = draw(st.integers(sq, 64))
    return dict(
        b=b,
        h=h,
        hk=hk,
        sq=sq,
        cap=cap,
        d=draw(st.sampled_from([16, 40])),
        ragged=draw(st.booleans()),
        leftpad=draw(st.booleans()),
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (5, 0), (3, 2), (0, -1)])),
        lse=draw(st.booleans()),
        new=draw(st.booleans()),
        seed=draw(st.integers(0, 10**6)),
    )


@settings(max_examples=60, deadline=None)
@given(cfg=prefill_calls())
def test_prefill_calls_match_the_oracle(cfg):
    """Calls with many query rows go to PyTorch's fused attention (masks, ragged rows, left
    padding, the LSE from the CPU flash kernel); every one matches the oracle, NaN rows unread."""
    g = torch.Generator().manual_seed(cfg["seed"])
    b, h, hk, sq, cap, d = cfg["b"], cfg["h"], cfg["hk"], cfg["sq"], cfg["cap"], cfg["d"]
    q = torch.randn(b, sq, h, d, generator=g)
    k_cache = torch.full((b, cap, hk, d), float("nan"))
    v_cache = torch.full((b, cap, hk, d), float("nan"))
    snew = sq if cfg["new"] else 0
    low = max(0, sq - snew) if not cfg["ragged"] else 0
    lens = torch.randint(low, cap - snew + 1, (b,), generator=g, dtype=torch.int32)
    if not cfg["ragged"]:
        lens[:] = lens[0]
    pads = None
    if cfg["leftpad"]:
        pads = (torch.rand(b, generator=g) * lens.float()).to(torch.int32)
    for i in range(b):
        lo = 0 if pads is None else int(pads[i])
        k_cache[i, lo : lens[i]] = torch.randn(int(lens[i]) - lo, hk, d, generator=g)
        v_cache[i, lo : lens[i]] = torch.randn(int(lens[i]) - lo, hk, d, generator=g)
    k = v = None
    if snew:
        k, v = torch.randn(b, snew, hk, d, generator=g), torch.randn(b, snew, hk, d, generator=g)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(
        q,
        kc,
        vc,
        k,
        v,
        cache_seqlens=lens,
        cache_leftpad=pads,
        causal=cfg["causal"],
        window_size=cfg["window"],
        return_softmax_lse=True,
        backend="torch",
    )
    window = cfg["window"]
    if window[0] >= 0 and window[1] < 0 and not cfg["causal"]:
        window = (window[0], cap)  # FlashAttention bounds a one-sided window by the capacity
    clean_k, clean_v = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    ref, ref_lse = attention_ref(
        q, clean_k, clean_v, seqlens_k=lens + snew, leftpad_k=pads, causal=cfg["causal"], window_size=window,
        return_lse=True,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


def test_each_call_goes_to_the_engine_that_is_faster_for_it():
    """Prefill-sized calls and decode steps over short caches use the fused kernel; decode steps
    over long caches, softcap and ALiBi use the per-head kernel."""
    q = torch.randn(2, 40, 4, 16)
    kc = torch.randn(2, 1024, 2, 16)
    short, long = torch.tensor([40, 40], dtype=torch.int32), torch.tensor([1000, 900], dtype=torch.int32)
    check = lambda q, lens, **kw: check_kvcache_call(q, kc, kc, cache_seqlens=lens, causal=True, backend="torch", **kw)
    assert torch_backend.uses_fused_kernel(check(q, short))
    assert torch_backend.uses_fused_kernel(check(q[:, :1], short))
    assert not torch_backend.uses_fused_kernel(check(q[:, :1], long))
    assert not torch_backend.uses_fused_kernel(check(q, short, softcap=2.0))
    assert not torch_backend.uses_fused_kernel(check(q, short, alibi_slopes=torch.rand(4)))


@settings(max_examples=25, deadline=None)
@given(
    lens=st.lists(st.integers(0, 1000), min_size=1, max_size=3),
    window=st.sampled_from([(-1, -1), (100, 0), (0, 0)]),
    seed=st.integers(0, 10**6),
)
def test_decode_over_long_caches_matches_the_oracle(lens, window, seed):
    """The per-head kernel's decode steps over long, ragged caches (NaN past each row)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, 1, 4, 16, generator=g)
    kc, vc = torch.full((b, 1000, 2, 16), float("nan")), torch.full((b, 1000, 2, 16), float("nan"))
    for i, n in enumerate(lens):
        kc[i, :n], vc[i, :n] = torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, window_size=window, causal=True, return_softmax_lse=True, backend="torch"
    )
    ref, ref_lse = attention_ref(
        q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), seqlens_k=seqlens, window_size=window, causal=True, return_lse=True
    )
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sink", [False, True], ids=["plain", "sink"])
@pytest.mark.parametrize("heads", [(8, 2), (6, 3), (4, 4), (4, 1)], ids=["g4", "g2", "mha", "mqa"])
def test_a_decode_step_with_its_query_heads_packed_per_kv_head_matches_the_oracle(heads, sink, monkeypatch):
    """A decode step that sees whole rows reads each KV head once: its g query heads become g query
    rows of one fused call (FlashAttention 3's pack_gqa). Output, LSE and the sink's rescaling
    against the oracle; the packed call really ran."""
    h, hk = heads
    g = torch.Generator().manual_seed(h * 10 + hk)
    q = torch.randn(3, 1, h, 16, generator=g)
    kc, vc = torch.randn(3, 40, hk, 16, generator=g), torch.randn(3, 40, hk, 16, generator=g)
    k_new, v_new = torch.randn(3, 1, hk, 16, generator=g), torch.randn(3, 1, hk, 16, generator=g)
    lens = torch.tensor([30, 30, 30], dtype=torch.int32)
    sinks = torch.randn(h, generator=g) if sink else None
    shapes = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch_backend.F,
        "scaled_dot_product_attention",
        lambda qt, *a, **kw: (shapes.append(tuple(qt.shape)), real(qt, *a, **kw))[1],
    )
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(
        q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=True, return_softmax_lse=True,
        learnable_sink=sinks, backend="torch",
    )  # fmt: skip
    kc_ref[:, 30:31], vc_ref[:, 30:31] = k_new, v_new
    ref, ref_lse = attention_ref(q, kc_ref, vc_ref, seqlens_k=lens + 1, causal=True, return_lse=True)
    if sink:  # the oracle's softmax with exp(sink) in each row's denominator
        total = torch.logaddexp(ref_lse, sinks.view(1, -1, 1))
        ref, ref_lse = ref * torch.exp(ref_lse - total).transpose(1, 2)[..., None], total
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=2e-5, atol=2e-5)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    if not sink:  # without an LSE the call goes to scaled_dot_product_attention: packed when h > hk
        again = flash_attn_with_kvcache(q, kc_ref.clone(), vc_ref.clone(), cache_seqlens=lens + 1, backend="torch")
        torch.testing.assert_close(again, ref, rtol=2e-5, atol=2e-5)
        assert shapes == [(3, hk, h // hk, 16) if h != hk else (3, h, 1, 16)]


# --- what the backend reads -------------------------------------------------------------------------


def test_only_the_rows_of_each_sequence_are_read():
    """Keys [3, 6) of row 0 and [4, 5) of row 1; everything else NaN. Both engines stay finite."""
    for sq in (1, 40):
        q = torch.randn(2, sq, 2, 8)
        k = torch.full((2, 10, 1, 8), float("nan"))
        v = torch.full((2, 10, 1, 8), float("nan"))
        k[:, 3:6], v[:, 3:6] = torch.randn(2, 3, 1, 8), torch.randn(2, 3, 1, 8)
        out, lse = flash_attn_with_kvcache(
            q,
            k,
            v,
            cache_seqlens=torch.tensor([6, 5], dtype=torch.int32),
            cache_leftpad=torch.tensor([3, 4], dtype=torch.int32),
            return_softmax_lse=True,
            backend="torch",
        )
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_the_mask_is_skipped_only_when_every_query_sees_every_key():
    """At the window's edges (one key fewer on either side) the backend must still mask:
    checked against the textbook formula for decode and prefill sizes."""
    g = torch.Generator().manual_seed(5)
    for sq, sk in [(1, 1), (1, 5), (2, 2), (3, 6), (4, 4), (33, 40)]:
        q, k, v = (torch.randn(1, n, 2, 8, generator=g) for n in (sq, sk, sk))
        for left in sorted({-1, 0, sk - 2, sk - 1, sk} - {-2}):
            for right in sorted({-1, 0, sq - 2, sq - 1, sq} - {-2}):
                if left >= 0 and right < 0:
                    continue  # FlashAttention bounds that window by the capacity (tested above)
                mask = attention_mask(sq, sk, window_size=(left, right))
                expected = torch.where(mask.any(-1)[None, :, None, None], naive_attention(q, k, v, mask=mask), 0.0)
                out = flash_attn_with_kvcache(q, k, v, window_size=(left, right), backend="torch")
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"{sq} {sk} {left} {right}")


# --- one device-to-host read per call --------------------------------------------------------------

HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu"}


class CountHostReads(TorchFunctionMode):
    """Counts the tensor methods that bring a value back to the host."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _checked_call(paged: bool, sq: int, skip: bool = False):
    cfg = dict(
        make_config(random.Random(3)),
        sq=sq,
        cap=64,
        d=32,
        new_kv=True,
        paged=16 if paged else None,
        leftpad=not paged,
        batch_idx=not paged,
        rotary_fraction=1.0,
        alibi=False,
        softcap=0.0,
        lse=True,
        num_splits=0,
    )
    counter = CountHostReads()

    @contextlib.contextmanager
    def during_call():
        with counter, skip_value_checks() if skip else contextlib.nullcontext():
            yield

    run_case(cfg, "torch", dtype=torch.float32, during_call=during_call())
    return counter.reads


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("sq", [1, 40], ids=["decode", "prefill"])
def test_a_call_reads_the_device_once(paged, sq):
    """Every check that reads tensor values (lengths, leftpad, batch indices, block table, rotary
    reach) and every number the backend needs come back in one read."""
    assert len(_checked_call(paged, sq)) == 1


def test_value_checks_can_be_skipped_for_graph_capture():
    """Inside skip_value_checks() nothing is read back, and the result is the same."""
    assert _checked_call(paged=True, sq=1, skip=True) == []
    assert _checked_call(paged=False, sq=40, skip=True) == []


def test_the_counter_would_notice_a_second_read():
    counter = CountHostReads()
    with counter:
        x = torch.arange(4)
        int(x.max()), bool((x > 1).any())
    assert counter.reads == ["__int__", "__bool__"]


# --- layers import downwards only -------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """The flashkv_edu modules a file imports (at any depth of the file)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("flashkv_edu") and _module_path(name):
                found.add(name)
    return found


def _module_path(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for candidate in (PACKAGE.parent / rel.with_suffix(".py"), PACKAGE.parent / rel / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_no_import_cycle_in_the_package():
    """The import graph of every module of flashkv_edu (imports inside functions included) has
    no cycle; the package's own __init__ re-exports are not edges."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = {m for m in _imports(path) if m != name and not name.startswith(m + ".")}
    modules = {
        n: {m for m in deps if m in modules and not m.endswith("__init__") and m != "flashkv_edu"}
        for n, deps in modules.items()
    }
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for dep in modules.get(node, ()):
            if state.get(dep) == "open":
                raise AssertionError(" -> ".join([*stack, node, dep]))
            if dep not in state:
                visit(dep, [*stack, node])
        state[node] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name, [])


def test_the_backend_does_not_import_the_oracle():
    assert not any("reference" in m for m in _imports(PACKAGE / "torch_backend.py"))
    assert not any("reference" in m for m in _imports(PACKAGE / "call.py"))
