"""flashkv_edu inside Hugging Face transformers (notebook 10): an attention implementation and a cache.

    from flashkv_edu import hf
    hf.register()                                   # attn_implementation="flashkv_edu"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flashkv_edu")
    cache = hf.FlashKVCache(model.config, max_batch_size=4, max_cache_len=512, page_size=16)
    out = model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), max_new_tokens=32)

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values``
to ``cache`` (the old name warns, and goes in 5.40 and 6.0): :func:`cache_kwargs` passes it under the
name the installed version takes.

What transformers passes to an attention function (after RoPE, after ``cache.update``):
``query`` ``(batch, heads, q_len, head_dim)``, ``key``/``value`` ``(batch, kv_heads, kv_len,
head_dim)``, the padding ``attention_mask`` (2-D ``(batch, kv_len)`` bool, or None when nothing
is padded, built by the same mask function as FlashAttention 2's integration), ``scaling``,
``sliding_window`` (HF's ``W`` = FlashAttention's ``window_size=(W - 1, 0)``) and ``softcap``.
:func:`attention` maps them onto :func:`flashkv_edu.flash_attn_with_kvcache`: bottom-right
causal over each row's keys, left padding as ``cache_leftpad``.

:class:`FlashKVCache` keeps every layer's keys and values in FlashAttention's layout ``(batch,
capacity, kv_heads, head_dim)``, contiguous or paged through notebook 06's
:class:`~flashkv_edu.paged.BlockAllocator`; the attention function then reads the cache in place.
transformers is an optional dependency: ``pip install 'flashkv_edu[hf]'``.
"""

from __future__ import annotations

import torch

from .api import flash_attn_with_kvcache
from .paged import BlockAllocator, gather_paged
from .validation import ArgumentError, check_int

NAME = "fkv_edu"
"""The attention implementation :func:`register` adds. Not "flashkv_edu": transformers treats any
name that contains "flash" as a FlashAttention kernel and takes other code paths for it (Falcon
and gpt-oss fail there), so the name leaves that word out."""
ALIAS = "flashkv_edu"
"""The earlier name, still registered where this transformers allows it (see :func:`register`)."""
INSTALL_HINT = (
    "flashkv_edu.hf needs Hugging Face transformers: pip install 'flashkv_edu[hf]' "
    "(or: pip install transformers). `python3 run.py lab` and `python3 run.py test` install it."
)

try:
    import transformers
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # the rest of the package works without transformers
    raise ImportError(INSTALL_HINT) from exc

_BACKEND = {"name": "auto"}


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


CACHE_ARGUMENT = "cache" if _release(transformers.__version__) >= (5, 24) else "past_key_values"
"""The keyword under which the installed transformers' ``forward`` and ``generate`` take a cache."""


def cache_kwargs(cache) -> dict:
    """``{CACHE_ARGUMENT: cache}``: ``model.generate(ids, **hf.cache_kwargs(cache))`` passes the cache
    under the name the installed transformers takes (``cache`` from 5.24, ``past_key_values`` before),
    so neither end of the supported range warns."""
    return {CACHE_ARGUMENT: cache}


def _left_padding(attention_mask, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """Leading masked columns of each row of a 2-D padding mask (None: no padding). Only left
    padding is FlashAttention's ``cache_leftpad``: anything else is refused."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ArgumentError(
            f"the {NAME} attention takes transformers' 2-D padding mask, got shape {tuple(attention_mask.shape)}; "
            f"call flashkv_edu.hf.register() before building the model"
        )
    mask = attention_mask[:, -kv_len:].to(device=device, dtype=torch.bool)
    pads = (mask.int().cumsum(-1) == 0).sum(-1)
    if bool((mask.sum(-1) != mask.shape[1] - pads).any()):
        raise ArgumentError(f"{NAME} supports left padding only (FlashAttention's cache_leftpad)")
    return pads.to(torch.int32) if bool(pads.any()) else None


def attention(
    module,
    query,
    key,
    value,
    attention_mask,
    scaling=None,
    dropout=0.0,
    sliding_window=None,
    softcap=None,
    **kwargs,
):
    """transformers' attention-function interface over :func:`flash_attn_with_kvcache`.
    Returns ``(out (batch, q_len, heads, head_dim), None)``."""
    if dropout:
        raise ArgumentError(f"{NAME} attention has no dropout (got {dropout}); use model.eval()")
    q = query.transpose(1, 2)
    b = q.shape[0]
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    common = dict(
        softmax_scale=scaling, causal=True, window_size=window, softcap=float(softcap or 0.0), backend=_BACKEND["name"]
    )
    layer = getattr(key, "_flashkv_layer", None)
    if layer is not None and layer.paged:  # ragged rows in a pool: padding was dropped from the cache
        layer.drop_left_padding(_left_padding(attention_mask, b, layer.length, q.device))
        rows = layer.active_rows()
        out = flash_attn_with_kvcache(
            q,
            layer.k_pool,
            layer.v_pool,
            cache_seqlens=layer.seqlens[rows],
            block_table=layer.block_table[rows],
            **common,
        )
    elif layer is not None:  # the contiguous cache, read in place
        pad = _left_padding(attention_mask, b, layer.length, q.device)
        seqlens = torch.full((b,), layer.length, dtype=torch.int32, device=q.device)
        out = flash_attn_with_kvcache(
            q, layer.k_cache, layer.v_cache, cache_seqlens=seqlens, cache_leftpad=pad, **common
        )
    else:  # any other cache (DynamicCache): key/value are the whole history, (b, kv_heads, kv_len, d)
        k, v = key.transpose(1, 2), value.transpose(1, 2)
        kv_len = k.shape[1]
        pad = _left_padding(attention_mask, b, kv_len, q.device)
        seqlens = torch.full((b,), kv_len, dtype=torch.int32, device=q.device)
        out = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_leftpad=pad, **common)
    return out, None


def register(backend: str = "auto") -> str:
    """Register the attention function (and FlashAttention 2's padding-mask builder) under
    ``"flashkv_edu"``; ``backend`` is the :func:`flash_attn_with_kvcache` backend it uses.
    Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from .runtime import BACKENDS

    if backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _BACKEND["name"] = backend
    for name in (NAME, ALIAS):
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, flash_attention_mask)
    _skip_flash_kernel_preload()
    return NAME


def _skip_flash_kernel_preload() -> None:
    """For the alias "flashkv_edu" only: transformers treats every implementation whose name
    contains "flash" as a FlashAttention kernel and preloads one (from the ``flash_attn`` package
    or its kernel hub) when a model is built; its loader is told to load nothing for the alias.
    :data:`NAME` needs none of this."""
    from transformers import modeling_flash_attention_utils as fa_utils

    load = fa_utils._lazy_imports
    if getattr(load, "_flashkv_wrapped", False):
        return

    def lazy_imports(implementation, *args, **kwargs):
        if implementation == ALIAS:
            return None, None, None, fa_utils._pad_input, fa_utils._unpad_input
        return load(implementation, *args, **kwargs)

    lazy_imports._flashkv_wrapped = True
    fa_utils._lazy_imports = lazy_imports


class FlashKVLayer(CacheLayerMixin):
    """One layer of :class:`FlashKVCache`. Contiguous: ``k_cache``/``v_cache`` ``(batch,
    capacity, kv_heads, head_dim)``, every row ``length`` tokens long (left padding included, as
    transformers counts). Paged: ``k_pool``/``v_pool`` ``(num_blocks, page, kv_heads, head_dim)``,
    ``block_table`` and per-row ``seqlens`` from this layer's own :class:`BlockAllocator`; left
    padding is dropped from the pool the first time attention sees the mask."""

    is_sliding = False
    is_compileable = False

    def __init__(self, batch: int, capacity: int, page_size: int | None, dtype=None, device=None):
        super().__init__()
        self.batch, self.capacity, self.page = batch, capacity, page_size
        self.dtype, self.device = dtype, device
        self.length = 0
        self.paged = page_size is not None
        self.pad = None  # paged: left padding dropped per row, once known
        self.rows = None  # paged: the cache rows this forward pass reads and writes (None: all)

    def lazy_initialization(self, key_states, value_states) -> None:
        b, hk, _, d = key_states.shape
        if b > self.batch:
            raise ArgumentError(f"batch of {b} sequences exceeds max_batch_size {self.batch}")
        if self.rows is None:  # generate(): the rows are the batch; serve(): all max_batch_size rows
            self.batch = b
        self.dtype = self.dtype or key_states.dtype
        self.device = self.device or key_states.device
        kw = dict(dtype=self.dtype, device=self.device)
        if self.paged:
            blocks_per_seq = -(-self.capacity // self.page)
            self.allocator = BlockAllocator(self.batch * blocks_per_seq, self.page)
            self.k_pool = torch.zeros(self.batch * blocks_per_seq, self.page, hk, d, **kw)
            self.v_pool = torch.zeros_like(self.k_pool)
            self.block_table = torch.zeros(self.batch, blocks_per_seq, dtype=torch.int32, device=self.device)
            self.blocks = [[] for _ in range(self.batch)]
            self.seqlens = torch.zeros(self.batch, dtype=torch.int32, device=self.device)
        else:
            self.k_cache = torch.zeros(self.batch, self.capacity, hk, d, **kw)
            self.v_cache = torch.zeros_like(self.k_cache)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append ``(batch, kv_heads, s, head_dim)`` keys/values; return the whole history in
        transformers' layout (a view of the contiguous cache, a gathered copy of a paged one),
        tagged so that the flashkv_edu attention reads the cache itself instead."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, _, s, _ = key_states.shape
        rows = self.active_rows()
        if b != len(rows):
            raise ArgumentError(f"this step covers {len(rows)} cache rows, update has {b} sequences")
        longest = int(self.seqlens[rows].max()) if self.paged else self.length
        if longest + s > self.capacity:
            raise ArgumentError(f"cache overflow: {longest} + {s} tokens > max_cache_len {self.capacity}")
        k, v = key_states.transpose(1, 2).to(self.dtype), value_states.transpose(1, 2).to(self.dtype)
        if self.paged:
            self._append_paged(k, v)
        else:
            self.k_cache[:, self.length : self.length + s] = k
            self.v_cache[:, self.length : self.length + s] = v
        self.length += s
        keys, values = self._history()
        keys._flashkv_layer = self
        return keys, values

    def active_rows(self) -> torch.Tensor:
        """The cache rows of this step, as a long tensor."""
        if self.rows is None:
            return torch.arange(self.batch, device=self.device)
        return self.rows

    def _append_paged(self, k, v) -> None:
        s = k.shape[1]
        rows = self.active_rows()
        for row in rows.tolist():
            n = -(-(int(self.seqlens[row]) + s) // self.page) - len(self.blocks[row])
            if n > 0:
                new = self.allocator.allocate(n)
                self.block_table[row, len(self.blocks[row]) : len(self.blocks[row]) + n] = torch.tensor(new)
                self.blocks[row] += new
        pos = self.seqlens[rows].long()[:, None] + torch.arange(s, device=k.device)[None, :]
        blocks = self.block_table[rows].long().gather(1, pos // self.page)
        self.k_pool[blocks, pos % self.page] = k
        self.v_pool[blocks, pos % self.page] = v
        self.seqlens[rows] += s

    def _history(self):
        if not self.paged:
            return self.k_cache[:, : self.length].transpose(1, 2), self.v_cache[:, : self.length].transpose(1, 2)
        rows = self.active_rows()
        longest = max(self.length, int(self.seqlens[rows].max()))
        out = []
        for pool in (self.k_pool, self.v_pool):
            dense = gather_paged(pool, self.block_table[rows])
            hist = torch.zeros(len(rows), longest, *pool.shape[2:], dtype=pool.dtype, device=pool.device)
            for i, row in enumerate(rows.tolist()):
                n = int(self.seqlens[row])
                hist[i, longest - n :] = dense[i, :n]
            out.append(hist.transpose(1, 2))
        return out[0], out[1]

    def release(self, row: int) -> None:
        """Free a paged row's blocks and empty it, for the next request (continuous batching)."""
        for block in self.blocks[row]:
            self.allocator.free(block)
        self.blocks[row] = []
        self.block_table[row] = 0
        self.seqlens[row] = 0

    def drop_left_padding(self, pad) -> None:
        """Paged rows store no padding: shift each row's tokens left by its padding (once, at
        the first attention call) and shorten its ``seqlens``; the freed blocks return."""
        if self.pad is not None or pad is None:
            if self.pad is None:
                self.pad = torch.zeros(self.batch, dtype=torch.int32, device=self.device)
            return
        self.pad = pad.to(self.device)
        for pool in (self.k_pool, self.v_pool):
            dense = gather_paged(pool, self.block_table)
            for row in range(self.batch):
                p, n = int(pad[row]), int(self.seqlens[row])
                if p:
                    kept = dense[row, p:n]
                    pos = torch.arange(n - p, device=pool.device)
                    blocks = self.block_table[row].long()[pos // self.page]
                    pool[blocks, pos % self.page] = kept
        self.seqlens -= self.pad
        for row in range(self.batch):
            keep = -(-int(self.seqlens[row]) // self.page)
            for block in self.blocks[row][keep:]:
                self.allocator.free(block)
            self.blocks[row] = self.blocks[row][:keep]
            self.block_table[row, keep:] = 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized and self.paged:
            for row, blocks in enumerate(self.blocks):
                for block in blocks:
                    self.allocator.free(block)
                self.blocks[row] = []
            self.block_table.zero_()
            self.seqlens.zero_()
            self.pad = None

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("FlashKVCache does not support beam search")

    def bytes_in_use(self) -> int:
        """Bytes of keys and values this layer holds: whole capacity when contiguous, the blocks in
        use when paged."""
        if not self.is_initialized:
            return 0
        if self.paged:
            per_block = self.k_pool[0].numel() * self.k_pool.element_size() * 2
            return sum(len(b) for b in self.blocks) * per_block
        return 2 * self.k_cache.numel() * self.k_cache.element_size()


class FlashKVCache(Cache):
    """A transformers ``Cache`` storing keys and values in FlashAttention's layout.

    ``config``: the model's config (one :class:`FlashKVLayer` per layer); ``max_batch_size``
    sequences of up to ``max_cache_len`` tokens; ``page_size`` None for a contiguous cache, else
    pages of that many tokens from a :class:`~flashkv_edu.paged.BlockAllocator` per layer (rows
    are ragged there: left padding is not stored). ``dtype``/``device`` default to the first
    keys'. Use it with ``attn_implementation="flashkv_edu"`` (:func:`register`); with another
    implementation it still works, through transformers' layout (a copy when paged)."""

    def __init__(self, config, max_batch_size: int, max_cache_len: int, *, page_size=None, dtype=None, device=None):
        check_int("max_batch_size", max_batch_size, low=1)
        check_int("max_cache_len", max_cache_len, low=1)
        if page_size is not None:
            check_int("page_size", page_size, low=1)
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = [
            FlashKVLayer(max_batch_size, max_cache_len, page_size, dtype, device) for _ in range(cfg.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.max_batch_size, self.max_cache_len, self.page_size = max_batch_size, max_cache_len, page_size

    def bytes_in_use(self) -> int:
        """Bytes of keys and values held by all layers."""
        return sum(layer.bytes_in_use() for layer in self.layers)


@torch.no_grad()
def serve(model, prompts: list[list[int]], max_new_tokens, *, max_batch: int = 4, page_size: int = 16):
    """Continuous batching over a transformers model with a paged :class:`FlashKVCache`:
    between decode steps, finished requests leave (their blocks return to the pool) and waiting
    ones join (prefilled alone into a free row). Each step decodes every running request
    together, each at its own length: the attention reads rows ``block_table[rows]`` with
    their own ``cache_seqlens``, and each row's positions are its own.

    ``max_new_tokens``: one int, or one per prompt. Returns ``(outputs, trace)``: the greedy new
    tokens of each prompt, and one ``(step, running request ids, blocks in use per layer)`` tuple per
    decode step."""
    if model.config._attn_implementation not in (NAME, ALIAS):
        raise ArgumentError(f'serve() needs a model built with attn_implementation="{NAME}" (after register())')
    budget = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budget) != len(prompts) or min(budget) < 1:
        raise ArgumentError("max_new_tokens must be a positive int or one positive int per prompt")
    longest = max(len(p) + n for p, n in zip(prompts, budget, strict=True))
    cache = FlashKVCache(model.config, max_batch, longest, page_size=page_size)
    device = next(model.parameters()).device
    waiting = list(range(len(prompts)))
    running: dict[int, int] = {}  # cache row -> request
    outputs: list[list[int]] = [[] for _ in prompts]
    trace = []

    def forward(rows, ids, positions):
        for layer in cache.layers:
            layer.rows = torch.tensor(rows, device=device)
        logits = model(
            input_ids=ids, position_ids=positions, use_cache=True, attention_mask=None, **cache_kwargs(cache)
        ).logits[:, -1]
        return logits.argmax(-1).tolist()

    step = 0
    while waiting or running:
        for row in range(max_batch):  # admit: prefill new requests into free rows
            if row not in running and waiting:
                req = waiting.pop(0)
                ids = torch.tensor([prompts[req]], device=device)
                outputs[req].append(forward([row], ids, torch.arange(ids.shape[1], device=device)[None])[0])
                running[row] = req
        for row, req in list(running.items()):  # leave: done after the prefill token
            if len(outputs[req]) >= budget[req]:
                _release(cache, row)
                del running[row]
        if not running:
            continue
        rows = sorted(running)
        ids = torch.tensor([[outputs[running[r]][-1]] for r in rows], device=device)
        positions = cache.layers[0].seqlens[rows].long()[:, None]
        for r, token in zip(rows, forward(rows, ids, positions), strict=True):
            outputs[running[r]].append(token)
        trace.append((step, [running[r] for r in rows], sum(len(b) for b in cache.layers[0].blocks)))
        step += 1
        for row, req in list(running.items()):
            if len(outputs[req]) >= budget[req]:
                _release(cache, row)
                del running[row]
    return outputs, trace


def _release(cache: FlashKVCache, row: int) -> None:
    for layer in cache.layers:
        layer.release(row)


def load_local(path, attn_implementation: str = NAME, dtype=torch.float32):
    """A causal LM from a local checkpoint directory (``config.json`` + weights), no download,
    with the flashkv_edu attention registered."""
    from transformers import AutoModelForCausalLM

    if attn_implementation in (NAME, ALIAS):
        register(_BACKEND["name"])
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    ).eval()


__all__ = [
    "CACHE_ARGUMENT",
    "FlashKVCache",
    "FlashKVLayer",
    "attention",
    "cache_kwargs",
    "load_local",
    "register",
    "serve",
    "transformers",
]
