"""Memory budgets and the cost model of preemption."""

from __future__ import annotations

import math

import pytest

from flashkv_edu import charlm
from flashkv_edu.memory import (
    LLAMA_3_8B,
    crossover_tokens,
    measure_step_activations,
    plan_budget,
    prefill_flops,
    profile_budget,
    recompute_seconds,
    shape_of,
    swap_seconds,
)
from flashkv_edu.validation import ArgumentError

GiB = 2**30


def test_llama_3_8b_on_an_80_gb_gpu():
    """128 KiB per token (32 layers x 8 KV heads x (128 + 128) x 2 bytes); the pool is what 90 %
    of 80 GiB leaves after 16.06 GB of bf16 weights and an 8192-token step's activations."""
    shape = LLAMA_3_8B
    assert shape.kv_bytes_per_token() == 32 * 8 * 256 * 2 == 128 * 1024
    assert shape.kv_bytes_per_token(cache_dtype_bytes=1) == 64 * 1024  # an fp8 cache: half
    activations = shape.activation_bytes(8192, logits_rows=256)
    assert activations == 8192 * (4 * 4096 + 3 * 14336) * 2 + 256 * 128256 * 4
    budget = plan_budget(80 * GiB, shape.weight_bytes, activations, shape.kv_bytes_per_token())
    usable = int(0.9 * 80 * GiB) - 8_030_261_248 * 2 - activations
    assert budget.num_blocks == usable // (16 * 128 * 1024) == 28679
    assert budget.tokens == 458_864 and budget.sequences(500) == 28679 // 32
    assert budget.kv_bytes <= usable < budget.kv_bytes + budget.block_bytes


def test_a_budget_that_leaves_no_block_is_an_error():
    with pytest.raises(ArgumentError, match="less than one block"):
        plan_budget(16 * GiB, LLAMA_3_8B.weight_bytes, 0, LLAMA_3_8B.kv_bytes_per_token())
    with pytest.raises(ArgumentError, match="utilization"):
        plan_budget(80 * GiB, 0, 0, 1, utilization=1.5)


def test_profiled_budget_of_the_trained_model_measures_a_step():
    model, _ = charlm.load()
    shape = shape_of(model)
    measured = measure_step_activations(model, 512)
    estimate = shape.activation_bytes(512)
    assert 0.7 * estimate <= measured <= 1.3 * estimate  # the formula's "about" holds for this model
    assert measure_step_activations(model, 1024) == pytest.approx(2 * measured, rel=0.02)  # linear in tokens
    budget = profile_budget(model, 64 * 2**20, max_batched_tokens=512, block_size=16)
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    assert budget.weight_bytes == weights and budget.activation_bytes == measured
    assert budget.num_blocks == (int(0.9 * 64 * 2**20) - weights - measured) // (16 * shape.kv_bytes_per_token())


def test_cost_model():
    shape = LLAMA_3_8B
    assert prefill_flops(shape, 1000) == 2 * shape.params * 1000 + 2 * 32 * 4096 * 1000**2
    kv = shape.kv_bytes_per_token()
    # packed blocks over a 25 GB/s link against 400 TFLOP/s: swap is cheaper as soon as a block
    # is mostly full (a 1-token sequence still moves a whole block of 16)
    swap = lambda n: swap_seconds(kv, n, 25e9)  # noqa: E731
    recompute = lambda n: recompute_seconds(shape, n, 400e12)  # noqa: E731
    assert crossover_tokens(swap, recompute) == 5 and swap(4096) < recompute(4096)
    assert crossover_tokens(lambda n: 1.0, lambda n: 2.0) is None
    # one copy per layer and per key/value block, 10 us each: recompute wins short sequences
    many = lambda n: swap_seconds(kv, n, 25e9, copies_per_block=64, seconds_per_copy=10e-6)  # noqa: E731
    cross = crossover_tokens(many, recompute)
    assert cross is not None and many(cross) < recompute(cross) and many(cross - 1) >= recompute(cross - 1)
    assert many(16) == pytest.approx(2 * (16 * kv / 25e9 + 64 * 10e-6))
    assert math.isclose(recompute_seconds(shape, 10, 1e12, overhead_s=0.5), 0.5 + prefill_flops(shape, 10) / 1e12)
