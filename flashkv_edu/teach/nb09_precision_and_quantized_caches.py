"""Notebook 09: figures, the quantization explorer, exercise checks and their solutions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from .. import quant as Q
from .. import runtime
from ..quant_eval import (  # noqa: F401  (notebook 09's experiments live in the package; the notebook calls them as nb09.*)
    attention_error,
    attention_through_cache,
    calibrate_fp8,
    model_loss,
    outlier_keys,
    record_kv,
    scheme_losses,
)
from ..runtime import tl, triton
from .exercise import CaseFailed, Exercise, call_unchanged, expect_close, expect_equal, expect_pair, run_check

EXERCISES = [
    Exercise("09", "quantize_symmetric", "check_quantize_symmetric", 15),
    Exercise("09", "quantize_keys_per_channel", "check_quantize_keys_per_channel", 20),
    Exercise("09", "cache_bytes_per_token", "check_cache_bytes_per_token", 15),
    Exercise("09", "my_dequantize", "check_dequantize", 20, triton=True),
]


# --- data ------------------------------------------------------------------------------------


# --- figures ---------------------------------------------------------------------------------


def draw_memory(shape_name: str, kib: dict):
    """Horizontal bars: KV-cache KiB per token of one model under each scheme."""
    fig, ax = plt.subplots(figsize=(10, 4.6))
    names = list(kib)
    ax.barh(names, [kib[n] for n in names], color=["tab:gray"] * 3 + ["tab:orange"] * 3 + ["tab:blue"] * 6)
    ax.invert_yaxis()
    ax.set_xlabel("KiB per token (K and V, all layers, scales included, 4K context)")
    ax.set_title(f"KV-cache memory per token: {shape_name}")
    for i, n in enumerate(names):
        ax.text(kib[n], i, f" {kib[n]:.1f}", va="center", fontsize=10)
    fig.tight_layout()
    return fig


def draw_channel_absmax(k: torch.Tensor, title: str):
    """Bar chart of each channel's largest |key| (over tokens), one KV head."""
    amax = k[0, :, 0].abs().amax(0)
    fig, ax = plt.subplots(figsize=(10, 3.4))
    ax.bar(range(len(amax)), amax.tolist(), color="tab:blue")
    ax.set_xlabel("channel (head dim index)")
    ax.set_ylabel("max |k| over tokens")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def draw_error_vs_bits(errors: dict):
    """``errors[label] = {bits: error}``: attention-output error against bits per element."""
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for label, by_bits in errors.items():
        bits = sorted(by_bits)
        ax.plot(bits, [by_bits[b] for b in bits], "o-", label=label)
    ax.set_yscale("log")
    ax.set_xticks([2, 4, 8])
    ax.set_xlabel("bits per stored element")
    ax.set_ylabel("mean |attention output error|")
    ax.set_title("Attention error vs bits (keys with outlier channels)")
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def explore(kind: str = "int per token", bits: int = 4, group: int = 32, outlier: float = 20.0, seed: int = 0):
    """One picture of a scheme: histogram of the round-trip error of keys whose outlier
    channels are ``outlier`` times larger, with the attention-output error and memory in the
    title. Returns ``(fig, error, kib_per_token)``."""
    k, v = outlier_keys(seed, factor=outlier)
    q = torch.randn(1, k.shape[1], 4, k.shape[3], generator=torch.Generator().manual_seed(seed + 1))
    if kind == "fp8 e4m3":
        scheme = Q.SCHEMES["fp8 e4m3, per-(batch, head) scale"]
    else:
        kivi = kind == "int KIVI"
        scheme = Q.Scheme(
            kind,
            "int",
            bits,
            k_axis="channel" if kivi else "token",
            group=group,
            symmetric=False,
            residual=32 if kivi else 0,  # as notebook 09's KIVI schemes: the 32 newest tokens stay 16-bit
        )
    err = attention_error(q, k, v, scheme)
    kib = Q.bytes_per_token(scheme, 32, 8, 128) / 1024
    diff = (Q.roundtrip(k, scheme, "k") - k).flatten()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.hist(diff.tolist(), bins=60, color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("stored - true key value")
    ax.set_ylabel("elements")
    label = kind if kind == "fp8 e4m3" else f"{kind}, {bits} bits, groups of {group}"
    ax.set_title(f"{label}: attention error {err:.2e}, {kib:.1f} KiB/token (Llama-3-8B, 4096 tokens)")
    fig.tight_layout()
    return fig, err, kib


def quant_explorer():
    """Widget: outlier size (slider), bits, group size and scheme -> :func:`explore`'s picture."""
    import ipywidgets as w

    def redraw(outlier, bits, group, kind):
        explore(kind, bits, group, outlier)
        plt.show()

    return w.interactive(
        redraw,
        outlier=w.IntSlider(value=20, min=1, max=40, description="outlier x"),
        bits=w.Dropdown(options=[2, 4, 8], value=4, description="bits"),
        group=w.Dropdown(options=[16, 32, 64], value=32, description="group"),
        kind=w.Dropdown(options=["int per token", "int KIVI", "fp8 e4m3"], description="scheme"),
    )


# --- exercise 1: symmetric per-token quantization ----------------------------------------------


def quantize_symmetric(x, bits):
    """Per-token symmetric quantization of ``x`` ``(..., d)``: returns ``(codes, scale)`` with
    integer-valued ``codes`` like ``x`` in ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]`` and ``scale``
    ``(..., 1)`` = absmax over the last dim / (2^(bits-1) - 1)."""
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def check_quantize_symmetric(fn) -> bool | None:
    """Codes in range and integer, scale = absmax / qmax per token, error <= scale / 2."""

    def case(bits, shape, seed, spread, zero_token=False):
        def run(f):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(shape, generator=g) * spread
            x[..., 0] *= 10  # one large channel per token
            if zero_token:
                x[(0,) * (x.dim() - 1)] = 0.0  # a token of zeros: its scale must not divide by 0
            codes, scale = expect_pair("result", call_unchanged(f, x, bits))
            codes, scale = torch.as_tensor(codes).float(), torch.as_tensor(scale).float()
            qmax = 2 ** (bits - 1) - 1
            want_scale = x.abs().amax(-1, keepdim=True) / qmax
            expect_equal("codes shape", tuple(x.shape), tuple(codes.shape))
            if not bool(torch.isfinite(codes).all()) or not bool(torch.isfinite(scale).all()):
                raise CaseFailed("codes and scales must be finite: a token of zeros has max|x| = 0 (guard the scale)")
            if zero_token:  # any positive scale is right for zeros: they come back as 0
                zero = (0,) * (x.dim() - 1)
                if bool((codes[zero] != 0).any()) or not bool(scale[zero] > 0):
                    raise CaseFailed(
                        f"a token of zeros must give codes 0 and a positive scale, got codes "
                        f"{codes[zero].tolist()[:4]}... and scale {scale[zero].item():g}"
                    )
                want_scale[zero] = scale[zero]
            if tuple(scale.shape) != tuple(want_scale.shape):
                raise CaseFailed(
                    f"scale: expected one per token, shape {tuple(want_scale.shape)}, got {tuple(scale.shape)}"
                )
            if not torch.allclose(scale, want_scale, rtol=1e-5):
                raise CaseFailed(
                    f"scale: expected absmax / {qmax} per token, e.g. {want_scale.flatten()[0].item():.5g}, "
                    f"got {scale.flatten()[0].item():.5g}"
                )
            if not torch.equal(codes, codes.round()) or codes.abs().max() > qmax:
                raise CaseFailed(
                    f"codes must be integers in [-{qmax}, {qmax}], got range "
                    f"[{codes.min().item():g}, {codes.max().item():g}]"
                )
            err = (codes * scale - x).abs() - scale / 2
            if err.max() > 1e-5 * float(x.abs().max()):
                idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
                raise CaseFailed(
                    f"at {idx}: x = {x[idx].item():.5g} came back as "
                    f"{(codes * scale)[idx].item():.5g}, more than scale / 2 away (round to nearest)"
                )

        return f"bits={bits}, x of shape {shape}" + (", its first token all zeros" if zero_token else ""), run

    cases = [
        case(8, (4, 16), 0, 1.0),
        case(4, (2, 3, 32), 1, 0.1),
        case(2, (5, 8), 2, 3.0),
        case(8, (3, 16), 3, 1.0, zero_token=True),
    ]
    return run_check("check_quantize_symmetric", fn, cases, "8, 4 and 2 bits: range, scale, rounding, a token of zeros")


# --- exercise 2: KIVI's per-channel keys ---------------------------------------------------------


def quantize_keys_per_channel(k, bits, group):
    """KIVI's key quantization: ``k`` ``(tokens, channels)``, tokens a multiple of ``group``;
    asymmetric ``bits``-bit codes with one scale and one zero point per channel and group of
    ``group`` tokens. Returns ``(codes (tokens, channels), scale (tokens / group, channels), zero
    (tokens / group, channels))`` with ``k ~ codes * scale + zero`` (scale and zero repeated over
    each group's tokens)."""
    t, c = k.shape
    groups = k.reshape(t // group, group, c)
    zero = groups.amin(1)
    span = groups.amax(1) - zero
    levels = 2**bits - 1
    scale = torch.where(span > 0, span / levels, torch.ones_like(span))
    codes = torch.round((groups - zero[:, None]) / scale[:, None]).clamp(0, levels)
    return codes.reshape(t, c), scale, zero


def check_quantize_keys_per_channel(fn) -> bool | None:
    """Keys with outlier channels and an offset: shapes, codes in ``[0, 2^bits)``, scale =
    (max - min) / (2^bits - 1) per channel and group, every key back within scale / 2."""
    gen = torch.Generator().manual_seed(91)

    def case(bits, tokens, channels, group, constant=False):
        def run(f):
            k = torch.randn(tokens, channels, generator=gen) + 2.0  # not centred: a zero point is needed
            k[:, 3] *= 20  # an outlier channel, as in real models' keys
            if constant:
                k[:group, 1] = 0.75  # a channel constant over the first group
            codes, scale, zero = (torch.as_tensor(t).float() for t in _expect_triple(call_unchanged(f, k, bits, group)))
            for name, t in (("codes", codes), ("scale", scale), ("zero", zero)):
                if not bool(torch.isfinite(t).all()):
                    raise CaseFailed(f"{name} must be finite: a channel constant over a group has max - min = 0")
            expect_equal("codes shape", (tokens, channels), tuple(codes.shape))
            expect_equal("scale shape (one per group of tokens and channel)", (tokens // group, channels),
                         tuple(scale.shape))  # fmt: skip
            expect_equal("zero shape", (tokens // group, channels), tuple(zero.shape))
            grouped = k.reshape(tokens // group, group, channels)
            want = (grouped.amax(1) - grouped.amin(1)) / (2**bits - 1)
            flat = want == 0  # a constant channel: any positive scale brings it back (codes 0, zero = the value)
            if bool((scale[flat] <= 0).any()):
                raise CaseFailed("a channel constant over a group needs a positive scale (its codes are all 0)")
            want = torch.where(flat, scale, want)
            if not torch.allclose(scale, want, rtol=1e-5, atol=1e-7):
                i = tuple(int(x) for x in ((scale - want).abs() == (scale - want).abs().max()).nonzero()[0])
                raise CaseFailed(f"scale at (group, channel) {i}: expected (max - min) / {2**bits - 1} over the "
                                 f"group's tokens = {want[i].item():.5g}, got {scale[i].item():.5g}")  # fmt: skip
            if not torch.equal(codes, codes.round()) or codes.min() < 0 or codes.max() > 2**bits - 1:
                raise CaseFailed(
                    f"codes must be integers in [0, {2**bits - 1}], got [{codes.min():g}, {codes.max():g}]"
                )
            back = codes.reshape(tokens // group, group, channels) * scale[:, None] + zero[:, None]
            err = (back - grouped).abs() - scale[:, None] / 2
            if err.max() > 1e-4 * float(k.abs().max()):
                raise CaseFailed("a key came back more than scale / 2 from its value: round (k - zero) / scale")

        label = f"bits={bits}, {tokens} tokens x {channels} channels, groups of {group} tokens"
        return label + (", channel 1 constant over a group" if constant else ""), run

    cases = [case(4, 64, 16, 32), case(2, 32, 8, 8), case(8, 16, 4, 16), case(4, 32, 8, 16, constant=True)]
    return run_check("check_quantize_keys_per_channel", fn, cases, "4, 2 and 8 bits, per channel, asymmetric")


def _expect_triple(got) -> tuple:
    if not isinstance(got, tuple) or len(got) != 3:
        raise CaseFailed(f"return (codes, scale, zero), a tuple of three, got {type(got).__name__}")
    return got


# --- exercise 3: bytes per token -----------------------------------------------------------------


def cache_bytes_per_token(n_layers, nheads_k, headdim, bits, group, asymmetric):
    """KV-cache bytes per token of a whole model storing ``bits``-bit integers per token with
    one fp16 scale (and, if ``asymmetric``, one fp16 zero point) per ``group`` channels."""
    per_head = headdim * bits / 8 + (headdim // group) * 2 * (2 if asymmetric else 1)
    return 2 * n_layers * nheads_k * per_head


def check_cache_bytes_per_token(fn) -> bool | None:
    """Against :func:`flashkv_edu.quant.bytes_per_token` for per-token integer schemes."""

    def case(layers, hk, d, bits, group, asym):
        def run(f):
            scheme = Q.Scheme("x", "int", bits, group=group, symmetric=not asym)
            want = Q.bytes_per_token(scheme, layers, hk, d)
            got = f(layers, hk, d, bits, group, asym)
            if not isinstance(got, (int, float)) or abs(got - want) > 1e-6:
                raise CaseFailed(f"expected {want:g} bytes (K and V, every layer, scales included), got {got!r}")

        return f"layers={layers}, nheads_k={hk}, headdim={d}, bits={bits}, group={group}, asymmetric={asym}", run

    cases = [
        case(1, 1, 128, 8, 128, False),
        case(32, 8, 128, 8, 128, False),
        case(32, 8, 128, 4, 32, True),
        case(80, 8, 128, 2, 32, True),
        case(28, 4, 64, 4, 64, False),
        case(48, 16, 96, 8, 32, True),
    ]
    return run_check("check_cache_bytes_per_token", fn, cases, "8, 4 and 2 bits, symmetric and asymmetric")


# --- exercise 4 (Triton): the decode kernel's dequantize step ------------------------------------

if runtime.HAS_TRITON:
    # The package's own helper is the solution: the solved notebook shows its source.
    from ..kernels.decode import dequantize as my_dequantize  # noqa: F401

    @triton.jit
    def _dequantize_harness(X, S, OUT, N: tl.constexpr, D: tl.constexpr, PER_TOKEN: tl.constexpr,
                            FP8_BITS: tl.constexpr, FN: tl.constexpr):  # fmt: skip
        rows = tl.arange(0, N)
        cols = tl.arange(0, D)
        x = tl.load(X + rows[:, None] * D + cols[None, :])
        if PER_TOKEN:
            scale = tl.load(S + rows).to(tl.float32)[:, None]
        else:
            scale = tl.load(S)
        tl.store(OUT + rows[:, None] * D + cols[None, :], FN(x, scale, FP8_BITS))


def check_dequantize(fn) -> bool | None:
    """A tile of int8 codes with one scale per token, fp8 e4m3 with one descale, and fp8 read as
    bytes (decoded in software, as on sm_80), against PyTorch's dequantization."""
    gen = torch.Generator().manual_seed(92)

    def case(kind):
        def run(f):
            x = torch.randn(16, 32, generator=gen) * 3
            if kind == "int8":
                stored = x.round().clamp(-127, 127).to(torch.int8)
                scale = torch.rand(16, generator=gen) + 0.1
                want = stored.float() * scale[:, None]
                passed, per_token, bits = stored, True, False
            else:
                stored = x.to(torch.float8_e4m3fn)
                scale = torch.tensor([0.37])
                want = stored.float() * scale
                passed, per_token, bits = (stored.view(torch.uint8), False, True) if kind == "fp8 bytes" else (
                    stored, False, False)  # fmt: skip
            out = torch.full((16, 32), float("nan"))
            _dequantize_harness[(1,)](passed, scale, out, N=16, D=32, PER_TOKEN=per_token, FP8_BITS=bits, FN=f)
            expect_close("dequantized tile", want, out, atol=1e-5)

        label = {
            "int8": "int8 codes, one scale per token ([N, 1])",
            "fp8": "an fp8 e4m3 tile, one descale",
            "fp8 bytes": "fp8 e4m3 read as uint8 bytes (FP8_BITS=True), one descale",
        }[kind]
        return label, run

    return run_check(
        "check_dequantize", fn, [case("int8"), case("fp8"), case("fp8 bytes")], "int8 and fp8, native and bytes"
    )


@torch.no_grad()
def greedy_choices(model, tokens: torch.Tensor, prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced greedy choices for positions ``prompt - 1 .. s - 2`` of ``tokens``
    ``(n, s)``: ``(uncached, cached)`` argmax ids ``(n, s - prompt)``. Uncached: one forward
    over the whole sequence. Cached: prefill ``prompt`` tokens, then one token per step through
    the KV cache. Same tokens, same model; only the GEMM shapes differ."""
    n, s = tokens.shape
    uncached = model(tokens)[:, prompt - 1 : s - 1].argmax(-1)
    cache = model.new_cache(n, s)
    steps = [model(tokens[:, :prompt], cache)[:, -1]]
    for t in range(prompt, s - 1):
        steps.append(model(tokens[:, t : t + 1], cache)[:, -1])
    return uncached, torch.stack(steps, 1).argmax(-1)
