"""The error contract of flashkv_edu.quant: the codecs, ``Scheme`` and ``QuantizedKVCache``.
Each bad input gives the right exception type (also a RuntimeError, as FlashAttention's
errors are), a message naming the argument, and leaves every object bit-for-bit as it was
(the contract in tests/contract.py)."""

from __future__ import annotations

import pytest
import torch
from contract import call, case_registry, refused_unchanged, x4

from flashkv_edu import quant as Q
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()


# --- quant: the codecs ---------------------------------------------------------------------------------

with_nan = lambda: x4(1, 4, 2, 16).index_put_((torch.tensor([0]), torch.tensor([1])), torch.tensor(float("nan")))  # noqa: E731

bad("Scheme kind unknown", VALUE, "kind")(lambda: call(Q.Scheme, "x", "int4"))
bad("Scheme int bits 3", VALUE, "bits")(lambda: call(Q.Scheme, "x", "int", 3))
bad("Scheme bits float", TYPE, "bits")(lambda: call(Q.Scheme, "x", "int", 4.0))
bad("Scheme bits bool", TYPE, "bits")(lambda: call(Q.Scheme, "x", "int", True))
bad("Scheme group negative", VALUE, "group")(lambda: call(Q.Scheme, "x", "int", 4, group=-1))
bad("Scheme group float", TYPE, "group")(lambda: call(Q.Scheme, "x", "int", 4, group=2.5))
bad("Scheme residual negative", VALUE, "residual")(lambda: call(Q.Scheme, "x", "int", 4, residual=-5))
bad("Scheme residual float", TYPE, "residual")(lambda: call(Q.Scheme, "x", "int", 4, residual=1.5))
bad("Scheme symmetric a string", TYPE, "symmetric")(lambda: call(Q.Scheme, "x", "int", 4, symmetric="no"))
bad("Scheme k_axis tokens", VALUE, "k_axis")(lambda: call(Q.Scheme, "x", "int", 4, k_axis="tokens"))
bad("Scheme v_axis None", VALUE, "v_axis")(lambda: call(Q.Scheme, "x", "int", 4, v_axis=None))
bad("Scheme channel without group", VALUE, "group")(lambda: call(Q.Scheme, "x", "int", 4, k_axis="channel"))
bad("Scheme fp8 scale row", VALUE, "fp8_scale")(lambda: call(Q.Scheme, "x", "fp8", 8, fp8_scale="row"))
bad("Scheme fp8 bits 16", VALUE, "bits")(lambda: call(Q.Scheme, "x", "fp8", 16))
bad("Scheme float without dtype", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "float", 16))
bad("Scheme float dtype int8", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "float", 8, dtype=torch.int8))
bad("Scheme float bits disagree", VALUE, "bits")(lambda: call(Q.Scheme, "x", "float", 32, dtype=torch.float16))
bad("Scheme int with a dtype", VALUE, "dtype")(lambda: call(Q.Scheme, "x", "int", 8, dtype=torch.float16))
bad("Scheme fp8 with a group", VALUE, "group")(lambda: call(Q.Scheme, "x", "fp8", 8, group=32))
bad("Scheme name empty", TYPE, "name")(lambda: call(Q.Scheme, "", "int", 8))
bad("bytes_per_token n_layers -1", VALUE, "n_layers")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], -1, 8, 128)
)
bad("bytes_per_token nheads_k 0", VALUE, "nheads_k")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 0, 128)
)
bad("bytes_per_token headdim float", TYPE, "headdim")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 8, 128.0)
)
bad("bytes_per_token context 0", VALUE, "context")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int8 per token"], 32, 8, 128, 0)
)
bad("bytes_per_token scheme a string", TYPE, "scheme")(lambda: call(Q.bytes_per_token, "int8 per token", 32, 8, 128))
bad("bytes_per_token group does not divide", VALUE, "group")(
    lambda: call(Q.bytes_per_token, Q.SCHEMES["int4 per token, groups of 32"], 32, 8, 48)
)
bad("quantize_int bits 0", VALUE, "bits")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 0))
bad("quantize_int bits 9", VALUE, "bits")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 9))
bad("quantize_int axis tokens", VALUE, "axis")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, axis="tokens"))
bad("quantize_int group 0 per channel", VALUE, "group")(
    lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, axis="channel", group=0)
)
bad("quantize_int group -2", VALUE, "group")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, group=-2))
bad("quantize_int group does not divide", VALUE, "group")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, group=5))
bad("quantize_int a NaN", VALUE, "finite")(lambda: call(Q.quantize_int, with_nan(), 8))
bad("quantize_int empty", VALUE, "empty")(lambda: call(Q.quantize_int, x4(1, 0, 2, 16), 8))
bad("quantize_int ints", TYPE, "x")(lambda: call(Q.quantize_int, torch.ones(1, 4, 2, 16, dtype=torch.int32), 8))
bad("quantize_int 3-D", VALUE, "x")(lambda: call(Q.quantize_int, x4(4, 2, 16), 8))
bad("quantize_int symmetric int", TYPE, "symmetric")(lambda: call(Q.quantize_int, x4(1, 4, 2, 16), 8, symmetric=1))
bad("pack_codes out of range", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0, 16]]), 4))
bad("pack_codes negative", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[-1, 3]]), 4))
bad("pack_codes bits 3", VALUE, "bits")(lambda: call(Q.pack_codes, torch.tensor([[0, 1]]), 3))
bad("pack_codes ragged last dim", VALUE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0, 1, 2]]), 4))
bad("pack_codes floats", TYPE, "codes")(lambda: call(Q.pack_codes, torch.tensor([[0.0, 1.0]]), 4))
bad("unpack_codes int64", TYPE, "packed")(lambda: call(Q.unpack_codes, torch.tensor([[3]]), 4))
bad("unpack_codes bits 0", VALUE, "bits")(lambda: call(Q.unpack_codes, torch.tensor([[3]], dtype=torch.uint8), 0))
bad("fp8_descales a NaN", VALUE, "finite")(lambda: call(Q.fp8_descales, with_nan()))
bad("fp8_descales granularity", VALUE, "granularity")(lambda: call(Q.fp8_descales, x4(1, 4, 2, 16), "row"))
bad("fp8_descales empty", VALUE, "empty")(lambda: call(Q.fp8_descales, x4(1, 0, 2, 16)))
bad("quantize_fp8 descale 0", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.zeros(1, 2)))
bad("quantize_fp8 descale negative", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), -torch.ones(1, 2)))
bad("quantize_fp8 descale shape", VALUE, "descale")(lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.ones(2)))
bad("quantize_fp8 descale fp16", TYPE, "descale")(
    lambda: call(Q.quantize_fp8, x4(1, 4, 2, 16), torch.ones(1, 2, dtype=torch.float16))
)
bad("quantize_fp8 a NaN", VALUE, "finite")(lambda: call(Q.quantize_fp8, with_nan(), torch.ones(1, 2)))
bad("dequantize_fp8 of fp32", TYPE, "x8")(lambda: call(Q.dequantize_fp8, x4(1, 4, 2, 16), torch.ones(1, 2)))
bad("dequantize_fp8 descale inf", VALUE, "descale")(
    lambda: call(Q.dequantize_fp8, x4(1, 4, 2, 16).to(torch.float8_e4m3fn), torch.full((1, 2), float("inf")))
)
bad("roundtrip role q", VALUE, "role")(lambda: call(Q.roundtrip, x4(1, 4, 2, 16), Q.SCHEMES["fp16"], "q"))
bad("roundtrip scheme a string", TYPE, "scheme")(lambda: call(Q.roundtrip, x4(1, 4, 2, 16), "fp16"))
bad("roundtrip descale for an int scheme", VALUE, "descale")(
    lambda: call(Q.roundtrip, x4(1, 4, 2, 16), Q.SCHEMES["int8 per token"], descale=torch.ones(1, 2))
)
bad("roundtrip a NaN", VALUE, "finite")(lambda: call(Q.roundtrip, with_nan(), Q.SCHEMES["int8 per token"]))


# --- quant: QuantizedKVCache ----------------------------------------------------------------------------


def qcache(scheme="int4 KIVI", d=32):
    cache = Q.QuantizedKVCache(2, 64, 2, d, Q.SCHEMES[scheme])
    cache.append(x4(2, 40, 2, d), x4(2, 40, 2, d))
    return cache


def qcache_call(method, *args, scheme="int4 KIVI", **kwargs):
    cache = qcache(scheme)
    return (lambda: getattr(cache, method)(*args, **kwargs)), [cache]


bad("QuantizedKVCache scheme a string", TYPE, "scheme")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, "int8 per token")
)
bad("QuantizedKVCache fp16 scheme", VALUE, "integer schemes")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, Q.SCHEMES["fp16"])
)
bad("QuantizedKVCache group does not divide", VALUE, "group")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 48, Q.SCHEMES["int4 per token, groups of 32"])
)
bad("QuantizedKVCache capacity not a multiple", VALUE, "capacity")(
    lambda: call(Q.QuantizedKVCache, 1, 50, 1, 64, Q.SCHEMES["int2 KIVI"])
)
bad("QuantizedKVCache batch 0", VALUE, "batch")(
    lambda: call(Q.QuantizedKVCache, 0, 64, 1, 32, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache nheads_k float", TYPE, "nheads_k")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1.0, 32, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache headdim 0", VALUE, "headdim")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 0, Q.SCHEMES["int8 per token"])
)
bad("QuantizedKVCache 2-bit odd head dim", VALUE, "bytes")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 6, Q.Scheme("x", "int", 2))
)
bad("QuantizedKVCache device bogus", VALUE, "device")(
    lambda: call(Q.QuantizedKVCache, 1, 64, 1, 32, Q.SCHEMES["int8 per token"], device="bogus")
)
bad("append wrong KV heads", VALUE, "k")(lambda: qcache_call("append", x4(2, 3, 1, 32), x4(2, 3, 1, 32)))
bad("append k and v differ", VALUE, "k and v")(lambda: qcache_call("append", x4(2, 3, 2, 32), x4(2, 4, 2, 32)))
bad("append overflow", VALUE, "overflow")(lambda: qcache_call("append", x4(2, 25, 2, 32), x4(2, 25, 2, 32)))
bad("append a NaN", VALUE, "finite")(
    lambda: qcache_call("append", x4(2, 3, 2, 32), x4(2, 3, 2, 32).index_fill_(1, torch.tensor([1]), float("nan")))
)
bad("append integer keys", TYPE, "k")(
    lambda: qcache_call("append", torch.ones(2, 3, 2, 32, dtype=torch.int64), x4(2, 3, 2, 32))
)
bad("append a list", TYPE, "k")(lambda: qcache_call("append", [[1.0]], x4(2, 3, 2, 32)))
bad("attention q head dim", VALUE, "q")(lambda: qcache_call("attention", x4(2, 1, 4, 16)))
bad("attention q batch", VALUE, "q")(lambda: qcache_call("attention", x4(3, 1, 4, 32)))
bad("attention q heads not a multiple", VALUE, "q")(lambda: qcache_call("attention", x4(2, 1, 3, 32)))
bad("attention backend cuda", VALUE, "backend")(lambda: qcache_call("attention", x4(2, 1, 4, 32), backend="cuda"))
bad("attention unknown keyword", VALUE, "block_table")(
    lambda: qcache_call("attention", x4(2, 1, 4, 32), block_table=torch.zeros(2, 2, dtype=torch.int32))
)
bad("attention bad window", VALUE, "window_size")(
    lambda: qcache_call("attention", x4(2, 1, 4, 32), window_size=(-2, 0))
)


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 60
