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


MISTAKES = {
    "check_quantize_symmetric": [
        quantize_unsigned_range,
        quantize_floor,
        quantize_per_tensor,
        quantize_unguarded,
    ],
    "check_quantize_keys_per_channel": [kivi_per_token, kivi_symmetric],
    "check_cache_bytes_per_token": [bytes_keys_only, bytes_no_zero_point],
    "check_dequantize": [dequantize_no_scale, dequantize_bits_as_numbers],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb09, MISTAKES)
