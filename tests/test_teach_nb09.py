"""Notebook 09's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

import torch
from teach_harness import exercise_tests

from flashkv_edu.runtime import tl, triton
from flashkv_edu.teach import nb09_precision_and_quantized_caches as nb09


def quantize_unsigned_range(x, bits):  # 2^bits - 1 levels on each side: codes overflow the type
    qmax = 2**bits - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.round(x / scale), scale


def quantize_floor(x, bits):  # truncates instead of rounding: errors up to a whole step
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.floor(x / scale), scale


def quantize_per_tensor(x, bits):  # one scale for everything
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax() / qmax
    return torch.round(x / scale), scale


def quantize_unguarded(x, bits):  # a token of zeros divides by 0: NaN codes
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / qmax
    return torch.round(x / scale).clamp(-qmax, qmax), scale


def kivi_per_token(k, bits, group):  # scales over each token's channels: the outlier channel sets every scale
    t, c = k.shape
    zero = k.amin(1, keepdim=True).expand(t, c)
    scale = ((k.amax(1, keepdim=True) - k.amin(1, keepdim=True)) / (2**bits - 1)).expand(t, c)
    codes = torch.round((k - zero) / scale).clamp(0, 2**bits - 1)
    return codes, scale[::group].contiguous(), zero[::group].contiguous()


def kivi_symmetric(k, bits, group):  # no zero point: keys that are not centred lose half the levels
    t, c = k.shape
    groups = k.reshape(t // group, group, c)
    scale = groups.abs().amax(1) / (2 ** (bits - 1) - 1)
    codes = torch.round(groups / scale[:, None])
    return codes.reshape(t, c), scale, torch.zeros_like(scale)


def quantize_in_place(x, bits):  # x /= scale: the caller's tensor becomes the codes
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    x /= scale
    return x.round_().clamp_(-qmax, qmax), scale


def kivi_unguarded(k, bits, group):  # a channel constant over a group: scale 0, codes NaN
    t, c = k.shape
    groups = k.reshape(t // group, group, c)
    zero = groups.amin(1)
    scale = (groups.amax(1) - zero) / (2**bits - 1)
    codes = torch.round((groups - zero[:, None]) / scale[:, None]).clamp(0, 2**bits - 1)
    return codes.reshape(t, c), scale, zero


def kivi_floor(k, bits, group):  # truncation: a whole step of error
    t, c = k.shape
    groups = k.reshape(t // group, group, c)
    zero = groups.amin(1)
    span = groups.amax(1) - zero
    scale = torch.where(span > 0, span / (2**bits - 1), torch.ones_like(span))
    return torch.floor((groups - zero[:, None]) / scale[:, None]).reshape(t, c), scale, zero


@triton.jit
def dequantize_no_scale(x, scale, FP8_BITS: tl.constexpr):  # forgets the scale
    return x.to(tl.float32)


@triton.jit
def dequantize_bits_as_numbers(x, scale, FP8_BITS: tl.constexpr):  # e4m3 bytes read as integers 0..255
    return x.to(tl.float32) * scale


def bytes_keys_only(n_layers, nheads_k, headdim, bits, group, asymmetric):
    return n_layers * nheads_k * (headdim * bits / 8 + headdim // group * 2 * (2 if asymmetric else 1))


def bytes_no_zero_point(n_layers, nheads_k, headdim, bits, group, asymmetric):
    return 2 * n_layers * nheads_k * (headdim * bits / 8 + headdim // group * 2)


@triton.jit
def dequantize_always_decodes(x, scale, FP8_BITS: tl.constexpr):  # decodes e4m3 bits whatever the flag says
    from flashkv_edu.kernels.common import e4m3_to_float

    return e4m3_to_float(x) * scale


def bytes_fp32_scales(n_layers, nheads_k, headdim, bits, group, asymmetric):  # scales are fp16: 2 bytes
    return 2 * n_layers * nheads_k * (headdim * bits / 8 + headdim // group * 4 * (2 if asymmetric else 1))


def bytes_integer_division(n_layers, nheads_k, headdim, bits, group, asymmetric):  # headdim * (bits // 8)
    return 2 * n_layers * nheads_k * (headdim * (bits // 8) + headdim // group * 2 * (2 if asymmetric else 1))


MISTAKES = {
    "check_quantize_symmetric": [
        quantize_unsigned_range,
        quantize_floor,
        quantize_per_tensor,
        quantize_unguarded,
        quantize_in_place,
    ],
    "check_quantize_keys_per_channel": [kivi_per_token, kivi_symmetric, kivi_unguarded, kivi_floor],
    "check_cache_bytes_per_token": [bytes_keys_only, bytes_no_zero_point, bytes_fp32_scales, bytes_integer_division],
    "check_dequantize": [dequantize_no_scale, dequantize_bits_as_numbers, dequantize_always_decodes],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb09, MISTAKES)
