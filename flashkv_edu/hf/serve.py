"""Continuous batching over a transformers model with a paged FlashKVCache, and a local loader."""

from __future__ import annotations

import torch

from ..validation import ArgumentError, ArgumentTypeError, check_int
from .cache import FlashKVCache
from .compat import ALIAS, BACKEND, NAME, cache_kwargs
from .register import register


def check_prompts(model, prompts) -> list[list[int]]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ArgumentError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    vocab = getattr(model.config, "vocab_size", None)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.dtype.is_floating_point or p.dtype == torch.bool:
                raise ArgumentTypeError(f"prompts[{i}] must be a 1-D list of token ids, got {p!r}")
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not p:
            raise ArgumentError(f"prompts[{i}] must be a non-empty list of token ids, got {p!r}")
        ids = [check_int(f"prompts[{i}][{j}]", t, low=0) for j, t in enumerate(p)]
        if vocab is not None and max(ids) >= vocab:
            raise ArgumentError(f"prompts[{i}] holds token ids >= the vocabulary size {vocab}: {max(ids)}")
        out.append(ids)
    return out


@torch.no_grad()
def serve(model, prompts, max_new_tokens, *, max_batch: int = 4, page_size: int = 16):
    """Continuous batching over a transformers model with a paged :class:`FlashKVCache`:
    between decode steps, finished requests leave (their blocks return to the pool) and waiting
    ones join (prefilled alone into a free row). Each step decodes every running request
    together, each at its own length: the attention reads rows ``block_table[rows]`` with their
    own ``cache_seqlens``, and each row's positions are its own.

    ``prompts``: non-empty token-id lists; ``max_new_tokens``: one int >= 1, or one per prompt.
    Returns ``(outputs, trace)``: the greedy new tokens of each prompt, and one ``(step, running
    request ids, blocks in use)`` tuple per decode step."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in (NAME, ALIAS):
        raise ArgumentError(f'serve() needs a model built with attn_implementation="{NAME}" (after register())')
    prompts = check_prompts(model, prompts)
    if isinstance(max_new_tokens, (list, tuple)):
        budget = [check_int(f"max_new_tokens[{i}]", n, low=1) for i, n in enumerate(max_new_tokens)]
        if len(budget) != len(prompts):
            raise ArgumentError(f"max_new_tokens must hold one int per prompt ({len(prompts)}), got {len(budget)}")
    else:
        budget = [check_int("max_new_tokens", max_new_tokens, low=1)] * len(prompts)
    max_batch = check_int("max_batch", max_batch, low=1)
    page_size = check_int("page_size", page_size, low=1)
    longest = max(len(p) + n for p, n in zip(prompts, budget, strict=True))
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ArgumentError(f"a prompt plus its new tokens reaches {longest} positions; the model has {limit}")
    cache = FlashKVCache(config, max_batch, longest, page_size=page_size)
    device = next(model.parameters()).device
    waiting = list(range(len(prompts)))
    running: dict[int, int] = {}  # cache row -> request
    outputs: list[list[int]] = [[] for _ in prompts]
    trace = []

    def forward(rows, ids, positions):
        cache.rows = torch.tensor(rows, device=device)
        logits = model(
            input_ids=ids, position_ids=positions, use_cache=True, attention_mask=None, **cache_kwargs(cache)
        ).logits[:, -1]
        return logits.argmax(-1).tolist()

    def first_row():  # the cache opens its pool at the first forward pass
        return cache.open_row() if cache.store is not None else 0

    step = 0
    while waiting or running:
        while waiting and len(running) < max_batch:  # admit: prefill new requests into free rows
            req = waiting.pop(0)
            row = first_row()
            ids = torch.tensor([prompts[req]], device=device)
            outputs[req].append(forward([row], ids, torch.arange(ids.shape[1], device=device)[None])[0])
            running[row] = req
        for row, req in list(running.items()):  # leave: done after the prefill token
            if len(outputs[req]) >= budget[req]:
                cache.release(row)
                del running[row]
        if not running:
            continue
        rows = sorted(running)
        ids = torch.tensor([[outputs[running[r]][-1]] for r in rows], device=device)
        positions = cache.store.cache_seqlens[rows].long()[:, None]
        for r, token in zip(rows, forward(rows, ids, positions), strict=True):
            outputs[running[r]].append(token)
        trace.append((step, [running[r] for r in rows], sum(len(s.blocks) for s in cache.store.seqs.values())))
        step += 1
        for row, req in list(running.items()):
            if len(outputs[req]) >= budget[req]:
                cache.release(row)
                del running[row]
    return outputs, trace


def load_local(path, attn_implementation: str = NAME, dtype=torch.float32):
    """A causal LM from a local checkpoint directory (``config.json`` + weights), no download,
    with the flashkv_edu attention registered."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if not isinstance(path, (str, Path)) or not Path(path).is_dir():
        raise ArgumentError(f"path must be a local checkpoint directory (config.json + weights), got {path!r}")
    if attn_implementation in (NAME, ALIAS):
        register(BACKEND["name"])
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    ).eval()


__all__ = ["check_prompts", "load_local", "serve"]
