"""``FlashKVCache``: a transformers ``Cache`` storing keys and values in the package's caches.

One :class:`~flashkv_edu.cache.KVCache` per layer (contiguous), or one
:class:`~flashkv_edu.paged.PagedKVCache` whose block tables serve every layer (paged). With
flashkv_edu's attention its ``update`` writes nothing: it hands the new keys to the attention function
(:mod:`flashkv_edu.hf.handoff`), which checks the call, writes them through the package's one write
path and reads the cache in place.
"""

from __future__ import annotations

import numbers

import torch
from transformers.cache_utils import Cache

from ..api import run_checked_call
from ..cache import KVCache, write_kv
from ..call import check_kvcache_call
from ..paged import OutOfBlocksError, PagedKVCache, gather_paged
from ..validation import FLOAT_DTYPES, ArgumentError, ArgumentTypeError, check_int, check_tensor, value_checks_on
from .attention import checked_attention, left_padding
from .compat import ALIAS, ATTENTION_LAYER_TYPES, NAME
from .handoff import forget, hand_over
from .layers import FlashKVLayer, other_layer_classes


class FlashKVCache(Cache):
    """A transformers ``Cache`` storing keys and values in FlashAttention's layout, through the
    package's caches.

    ``config``: the model's config (one layer per model layer: attention layers are
    :class:`FlashKVLayer`, linear-attention and convolution layers transformers' own cache layers,
    other ``config.layer_types`` are refused, naming the type; a layer sharing an earlier layer's
    keys and values reads that layer's cache); ``max_batch_size`` sequences (beams
    included) of up to ``max_cache_len`` tokens; ``page_size`` None for a contiguous cache (one
    :class:`~flashkv_edu.cache.KVCache` per layer, left padding stored as transformers counts it),
    else a :class:`~flashkv_edu.paged.PagedKVCache` of that page size shared by all layers (rows
    are ragged: left padding is not stored). ``dtype``/``device`` default to the first keys'.

    Use it with ``attn_implementation=NAME`` (:func:`register`); with another implementation it
    still works, through transformers' layout (a gathered copy each step when paged). ``crop``,
    ``reorder_cache``, ``batch_select_indices`` and ``batch_repeat_interleave`` (assisted
    generation, beam search) rearrange rows without copying blocks when paged."""

    def __init__(self, config, max_batch_size: int, max_cache_len: int, *, page_size=None, dtype=None, device=None):
        max_batch_size = check_int("max_batch_size", max_batch_size, low=1)
        max_cache_len = check_int("max_cache_len", max_cache_len, low=1)
        if page_size is not None:
            page_size = check_int("page_size", page_size, low=1)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ArgumentTypeError(f"dtype must be None or a floating dtype (fp16, bf16, fp32, fp64), got {dtype!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise ArgumentError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        if isinstance(layers, bool) or not isinstance(layers, numbers.Integral) or layers < 1:
            raise ArgumentTypeError(f"config must be a transformers model config (num_hidden_layers), got {config!r}")
        kinds = list(getattr(text, "layer_types", None) or ["full_attention"] * layers)
        other = other_layer_classes()
        for i, kind in enumerate(kinds):
            if kind not in ATTENTION_LAYER_TYPES and kind not in other:
                raise ArgumentError(
                    f"FlashKVCache holds keys and values of attention layers and hands linear-attention and "
                    f"convolution layers ({', '.join(other) or 'none in this transformers'}) transformers' own; layer "
                    f"{i} of this model is {kind!r}. Use transformers' own cache (DynamicCache) with "
                    f"attn_implementation={NAME!r}"
                )
        attention = [i for i, kind in enumerate(kinds) if kind in ATTENTION_LAYER_TYPES]
        if not attention:
            raise ArgumentError("this model has no attention layer: FlashKVCache has nothing to hold")
        # Attention layers are FlashKVLayers; a hybrid model's other layers are transformers' own.
        super().__init__(layers=[FlashKVLayer(self, i) if i in attention else other[kinds[i]]() for i in range(layers)])
        self.attention_layers = attention
        self.first = attention[0]  # the first attention layer of a pass opens each step
        self.config = config
        self.max_batch_size, self.max_cache_len, self.page_size = max_batch_size, max_cache_len, page_size
        self.dtype, self.device = dtype, device
        self.batch = None  # rows in use (generate: the batch), fixed at the first update
        self.rows = None  # serve(): the rows of this step (a long tensor); None: all rows
        self.kv: list[KVCache | None] = [None] * layers  # contiguous
        self.store: PagedKVCache | None = None  # paged
        self.step_starts = self.step_counts = self.step_pads = None  # paged: this forward pass's appends
        self.step_longest = 0
        self.step_table = None  # paged: this pass's block-table rows
        self._last_call = None  # (signature, index tensors, KVCacheCall): see _decode
        self._starts = None  # contiguous: (batch, length, int32 tensor) of this decode step
        self._mask_pad = None  # (attention_mask, kv_len, left padding) last read

    # --- transformers' Cache methods, with the layer index checked -----------------------------------------

    def layer_index(self, layer_idx) -> int:
        """``layer_idx`` checked: an int naming one of this cache's layers."""
        return check_int("layer_idx", layer_idx, low=0, high=len(self.layers) - 1)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, self.layer_index(layer_idx), *args, **kwargs)

    def get_seq_length(self, layer_idx=0) -> int:
        return super().get_seq_length(self.layer_index(layer_idx))

    def get_mask_sizes(self, query_length, layer_idx) -> tuple[int, int]:
        query_length = check_int("query_length", query_length, low=0)
        return super().get_mask_sizes(query_length, self.layer_index(layer_idx))

    def get_max_length(self, layer_idx=None) -> int:
        return super().get_max_length(None if layer_idx is None else self.layer_index(layer_idx))

    # --- storage -------------------------------------------------------------------------------------

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    def _ours(self) -> bool:
        return getattr(self.config, "_attn_implementation", None) in (NAME, ALIAS)

    def initialize_layer(self, i: int, key_states, value_states) -> None:
        """The hook of :class:`FlashKVLayer`'s ``lazy_initialization``: allocate layer ``i``'s storage
        for keys shaped like ``key_states`` ``(batch, kv_heads, new, head_dim)``."""
        b, hk, _, d = key_states.shape
        dv = value_states.shape[3]
        if self.batch is None:
            if b > self.max_batch_size:
                raise ArgumentError(f"a batch of {b} sequences exceeds max_batch_size {self.max_batch_size}")
            self.batch = self.max_batch_size if self.rows is not None else b
            self.dtype = self.dtype or key_states.dtype
            self.device = self.device or key_states.device
        kw = dict(dtype=self.dtype, device=self.device)
        if not self.paged:
            self.kv[i] = KVCache(self.batch, self.max_cache_len, hk, d, headdim_v=dv, head_major=True, **kw)
            return
        if self.store is None:
            blocks_per_seq = -(-self.max_cache_len // self.page_size)
            self.store = PagedKVCache(
                self.max_batch_size * blocks_per_seq,
                self.page_size,
                hk,
                d,
                headdim_v=dv,
                max_batch=self.max_batch_size,
                max_blocks_per_seq=blocks_per_seq,
                prefix_caching=False,
                num_layers=len(self.layers),
                **kw,
            )
        pool, vpool = self.store.k_pools[i], self.store.v_pools[i]
        if pool.shape[2:] != (hk, d) or vpool.shape[3] != dv:
            self.store.resize_layer(i, hk, d, dv)

    def _check_states(self, i: int, key_states, value_states) -> tuple[int, int]:
        """Check one update against the layer (before anything changes); return ``(batch, new)``."""
        check_tensor("key_states", key_states, ndim=4, dtypes=FLOAT_DTYPES)
        check_tensor("value_states", value_states, ndim=4, dtypes=FLOAT_DTYPES)
        b, hk, s, d = key_states.shape
        if value_states.shape[:3] != key_states.shape[:3]:
            raise ArgumentError(
                f"key_states and value_states must agree in (batch, kv_heads, new tokens), got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if key_states.device != value_states.device:
            raise ArgumentError("key_states and value_states must be on one device")
        if self.batch is None and b > self.max_batch_size:
            raise ArgumentError(f"a batch of {b} sequences exceeds max_batch_size {self.max_batch_size}")
        rows = self.rows.numel() if self.rows is not None else (self.batch or b)
        if b != rows:
            raise ArgumentError(f"this step covers {rows} cache rows, the update has {b} sequences")
        if self.layers[i].is_initialized:
            k_shape, v_dim, device = self._shape(i)
            if (hk, d, value_states.shape[3]) != (*k_shape, v_dim):
                raise ArgumentError(
                    f"layer {i} stores (kv_heads, head_dim, head_dim_v) = {(*k_shape, v_dim)}; the update has "
                    f"{(hk, d, value_states.shape[3])}"
                )
            if key_states.device != device:
                raise ArgumentError(f"layer {i} lives on {device}, the update on {key_states.device}")
        if self.paged and self.store is not None and self.batch is not None:  # the lengths before this pass
            if i != self.first and self.step_starts is not None:
                longest = self.step_longest
            else:
                lengths = [self.store.seqs[r].length for r in self._rows().tolist() if r in self.store.seqs]
                longest = max(lengths, default=0)
        else:
            longest = self.layers[i].length
        if longest + s > self.max_cache_len:
            raise ArgumentError(f"cache overflow: {longest} + {s} tokens > max_cache_len {self.max_cache_len}")
        return b, s

    def _shape(self, i: int):
        if self.paged:
            pool, vpool = self.store.k_pools[i], self.store.v_pools[i]
        else:
            pool, vpool = self.kv[i].k_cache, self.kv[i].v_cache
        return tuple(pool.shape[2:]), vpool.shape[3], pool.device

    def _rows(self) -> torch.Tensor:
        if self.rows is not None:
            return self.rows
        return torch.arange(self.batch, device=self.device)

    def update_layer(self, i: int, key_states, value_states):
        """The hook of :class:`FlashKVLayer`'s ``update`` (transformers' ``cache.update``). With
        flashkv_edu's attention nothing is written: the new keys go to the attention function
        unchanged (:func:`~flashkv_edu.hf.handoff.hand_over`). Otherwise they are written now and
        the whole history is returned."""
        self._check_states(i, key_states, value_states)
        if self._ours() and self.layers[i].mode != "history":  # the attention writes, once it checked the mask
            hand_over(self, key_states, value_states, i)
            return key_states, value_states
        if not self.layers[i].is_initialized:
            self.layers[i].lazy_initialization(key_states, value_states)
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        self._write(i, k, v, None)
        return self._history(i)

    def _write(self, i: int, k, v, pad) -> torch.Tensor:
        """Append ``k``, ``v`` ``(b, s, kv_heads, d)`` to layer ``i`` (paged: without the left
        padding ``pad``); return each row's key count after it (int32)."""
        b, s = k.shape[:2]
        layer = self.layers[i]
        if not self.paged:  # every row holds layer.length tokens (left padding included)
            kv = self.kv[i]
            starts = torch.full((b,), layer.length, dtype=torch.int32, device=kv.k_cache.device)
            rows = None if self.rows is None else self.rows
            write_kv(kv.k_cache, kv.v_cache, k, v, starts, rows=rows, same_start=layer.length)
            layer.length += s
            self._set_lengths(i)
            return starts + s
        if i == self.first or self.step_starts is None:  # the first layer of a pass reserves for all layers
            self._begin_step(b, s, pad)
        counts, pads = self.step_counts, self.step_pads
        if pads is not None:  # row r keeps its tokens pads[r]:, shifted to the front
            index = (torch.arange(s, device=k.device)[None, :] + pads.long()[:, None]).clamp_max(s - 1)
            k = k.gather(1, index[:, :, None, None].expand_as(k))
            v = v.gather(1, index[:, :, None, None].expand_as(v))
        pool, vpool = self.store.k_pools[i], self.store.v_pools[i]
        table = self._table()
        write_kv(pool, vpool, k.to(pool.dtype), v.to(vpool.dtype), self.step_starts, block_table=table, counts=counts)
        layer.length += s
        return self.step_starts + counts

    def _begin_step(self, b: int, s: int, pad) -> None:
        """Paged: reserve each row's new tokens (left padding dropped) in every layer at once."""
        store = self.store
        rows = self._rows().tolist()
        for r in rows:  # generate() opens rows 0 .. batch-1 on first use, serve() its first row
            if r not in store.seqs:
                slot, _ = store.add_sequence()
                if slot != r:
                    store.free(slot)
                    raise ArgumentError(
                        f"row {r} of this step is not open in the paged cache (open rows: {sorted(store.seqs)})"
                    )
        pads = pad if pad is not None else None
        counts = torch.full((b,), s, dtype=torch.int32, device=self.device)
        if pads is not None:
            counts = counts - pads.to(counts.device)
        need = sum(store.blocks_needed(r, int(n)) for r, n in zip(rows, counts.tolist(), strict=True))
        if need > store.allocator.num_free:
            raise OutOfBlocksError(f"this step needs {need} free blocks, {store.allocator.num_free} are free")
        self.step_longest = max((store.seqs[r].length for r in rows), default=0)
        starts = torch.tensor([store.reserve(r, int(n)) for r, n in zip(rows, counts.tolist(), strict=True)])
        self.step_starts = starts.to(device=self.device, dtype=torch.int32)
        self.step_counts, self.step_pads = counts, pads
        self.step_table = self._table()

    def _history(self, i: int):
        """The whole history in transformers' layout (other attention implementations)."""
        rows = self._rows()
        if not self.paged:
            n = self.layers[i].length
            return self.kv[i].k_cache[rows, :n].transpose(1, 2), self.kv[i].v_cache[rows, :n].transpose(1, 2)
        # Paged rows store no left padding: each row's tokens go right-aligned into transformers'
        # (batch, kv_heads, length, d) layout, its padding columns left as zeros (the mask hides them).
        table, length = self.store.block_table[rows], self.layers[i].length
        out = []
        for pool in (self.store.k_pools[i], self.store.v_pools[i]):
            dense = gather_paged(pool, table)
            hist = dense.new_zeros(len(rows), length, *pool.shape[2:])
            for r, slot in enumerate(rows.tolist()):
                n = self.store.seqs[slot].length
                hist[r, length - n :] = dense[r, :n]
            out.append(hist.transpose(1, 2))
        return out[0], out[1]

    def settle_layer(self, i: int, key_states, value_states, attention_mask, device) -> None:
        """Layer ``i``'s model transformed the keys between ``update`` and attention (see
        :func:`~flashkv_edu.hf.handoff.settle_transformed`): write its pending keys (left padding
        dropped when paged) and serve it transformers' way from now on."""
        layer = self.layers[i]
        if layer.mode == "in_place":
            raise ArgumentError(
                f"layer {i} was read in place, and now its attention got keys the cache did not hand out: "
                "this model transforms the cached keys; use transformers' DynamicCache"
            )
        b, s = key_states.shape[0], key_states.shape[2]
        pad = left_padding(attention_mask, b, layer.length + s, device) if attention_mask is not None else None
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        new_pad = None
        if self.paged and pad is not None:
            new_pad = (pad - layer.length).clamp(0, s).to(torch.int32)
            new_pad = new_pad if bool(new_pad.any()) else None
        self._write(i, key_states.transpose(1, 2), value_states.transpose(1, 2), new_pad)
        layer.mode = "history"

    def attend_layer(self, i: int, q, key_states, value_states, attention_mask, options):
        """Write layer ``i``'s new keys and attend over the cache in place (called by :func:`attention`).

        A decode step (one new token per row, a cache in q's dtype) is one ``flash_attn_with_kvcache``
        call that appends and attends, as FlashAttention serves it; a prefill writes first (its left
        padding may exceed what is cached, and paged rows drop it), then attends."""
        b, s = q.shape[0], key_states.shape[2]
        layer = self.layers[i]
        pad = self._padding(attention_mask, b, layer.length + s, q.device)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.mode = "in_place"
        k, v = key_states.transpose(1, 2), value_states.transpose(1, 2)
        pools = (
            (self.store.k_pools[i], self.store.v_pools[i]) if self.paged else (self.kv[i].k_cache, self.kv[i].v_cache)
        )
        one_call = s == 1 and layer.length > 0 and k.dtype == pools[0].dtype == q.dtype
        if self.paged:
            if one_call:
                if i == self.first or self.step_starts is None:
                    self._begin_step(b, s, None)
                layer.length += s
                return self._decode(
                    q, *pools, k, v, options, cache_seqlens=self.step_starts, block_table=self.step_table
                )
            new_pad = None  # only the new tokens' padding is dropped (earlier steps dropped theirs)
            if pad is not None:
                new_pad = (pad - layer.length).clamp(0, s).to(torch.int32)
                new_pad = new_pad if bool(new_pad.any()) else None
            ends = self._write(i, k, v, new_pad)
            return checked_attention(
                q, *pools, cache_seqlens=ends.to(torch.int32), block_table=self._table(), **options
            )
        rows = None if self.rows is None else self.rows.to(torch.int32)  # generate(): rows 0 .. batch-1
        if one_call:
            if self._starts is None or self._starts[:2] != (b, layer.length) or self._starts[2].device != q.device:
                self._starts = (b, layer.length, torch.full((b,), layer.length, dtype=torch.int32, device=q.device))
            out = self._decode(
                q, *pools, k, v, options, cache_seqlens=self._starts[2], cache_batch_idx=rows, cache_leftpad=pad
            )
            layer.length += s
            self._set_lengths(i)
            return out
        ends = self._write(i, k, v, None)
        return checked_attention(q, *pools, cache_seqlens=ends, cache_batch_idx=rows, cache_leftpad=pad, **options)

    def read_layer(self, i: int, q, attention_mask, options):
        """Attention of ``q`` over layer ``i``'s cache as it stands, writing nothing: a layer that
        shares layer ``i``'s keys and values (Gemma 3n), right after layer ``i``'s own attention in
        the same pass."""
        layer = self.layers[i]
        b = q.shape[0]
        if self.paged:
            ends = (self.step_starts + self.step_counts).to(torch.int32)
            pools = (self.store.k_pools[i], self.store.v_pools[i])
            return checked_attention(q, *pools, cache_seqlens=ends, block_table=self._table(), **options)
        pad = self._padding(attention_mask, b, layer.length, q.device)
        ends = torch.full((b,), layer.length, dtype=torch.int32, device=q.device)
        rows = None if self.rows is None else self.rows.to(torch.int32)
        kv = self.kv[i]
        return checked_attention(
            q, kv.k_cache, kv.v_cache, cache_seqlens=ends, cache_batch_idx=rows, cache_leftpad=pad, **options
        )

    def _padding(self, attention_mask, b: int, kv_len: int, device):
        """:func:`~flashkv_edu.hf.attention.left_padding`, read once per mask: every layer of a pass
        gets the same mask."""
        memo = self._mask_pad
        if memo is not None and memo[0] is attention_mask and memo[1] == (b, kv_len, device):
            return memo[2]
        pad = left_padding(attention_mask, b, kv_len, device)
        self._mask_pad = (attention_mask, (b, kv_len, device), pad)
        return pad

    def _decode(self, q, k_cache, v_cache, k, v, options, **index):
        """One decode step of one layer: ``flash_attn_with_kvcache(q, k_cache, v_cache, k, v,
        **index, **options)``, with its check done once for all the layers of a step.

        :func:`~flashkv_edu.call.check_kvcache_call` depends only on the tensors' shapes, strides,
        dtypes and devices, on the option values and on the index tensors' values. Within a step
        every layer passes the same index tensors (the same objects, held here so none is freed
        and its id reused, and never written to) and, in a uniform model, the same shapes and
        options, so the first layer's checked call is the call of every other layer. Anything
        different (a sliding-window layer, another head dim, a learnable sink, a new step) is
        checked afresh."""
        signature = (
            [(t.shape, t.stride(), t.dtype, t.device) for t in (q, k_cache, v_cache, k, v)],
            options,  # plain values only: a call with a learnable sink (a tensor) is never reused
            value_checks_on(),
        )
        held = tuple(index.items())
        memo = self._last_call
        if (
            memo is not None
            and "learnable_sink" not in options
            and memo[0] == signature
            and len(memo[1]) == len(held)
            and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(memo[1], held, strict=True))
        ):
            call = memo[2]
        else:
            call = check_kvcache_call(q, k_cache, v_cache, k=k, v=v, **index, **options)
            self._last_call = (signature, held, call)
        return run_checked_call(call, q, k_cache, v_cache, k, v)[0]

    def _table(self) -> torch.Tensor:
        """Paged: the block-table rows of this step (read after the step's blocks were reserved)."""
        return self.store.block_table[: self.batch] if self.rows is None else self.store.block_table[self.rows]

    def _set_lengths(self, i: int) -> None:
        """Contiguous: the package cache's lengths follow the layer's (every row the same)."""
        kv = self.kv[i]
        if self.rows is None:
            kv.cache_seqlens[: self.batch] = self.layers[i].length
        else:
            kv.cache_seqlens[self.rows] = self.layers[i].length

    def _attention(self):
        return [(i, self.layers[i]) for i in self.attention_layers]

    def _others(self):
        return [layer for layer in self.layers if not isinstance(layer, FlashKVLayer)]

    # --- rows: serving, beam search, assisted generation -----------------------------------------------

    def open_row(self) -> int:
        """Paged, for :func:`serve`: a free row (slot) for a new request."""
        if not self.paged or self.store is None:
            raise ArgumentError("open_row needs a paged FlashKVCache that has seen its first keys")
        slot, _ = self.store.add_sequence()
        return slot

    def release(self, row: int) -> None:
        """Paged, for :func:`serve`: free ``row``'s blocks for the next request."""
        self.store.free(row)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens of every row (a positive value keeps that many,
        transformers' older convention): assisted generation's rollback."""
        n = check_int("tokens_to_remove", tokens_to_remove)
        length = self.layers[self.first].length
        remove = -n if n <= 0 else max(length - n, 0)
        if remove > length:
            raise ArgumentError(f"cannot remove {remove} tokens from a cache holding {length}")
        if remove == 0:
            return
        for i, layer in self._attention():
            layer.length -= remove
            if not self.paged and self.kv[i] is not None:
                self.kv[i].cache_seqlens -= remove
        for layer in self._others():
            layer.crop(n)
        if self.paged and self.store is not None:
            for slot, seq in list(self.store.seqs.items()):
                self.store.truncate(slot, max(seq.length - remove, 0))

    def reorder_cache(self, beam_idx) -> None:
        """Row ``j`` becomes what row ``beam_idx[j]`` was (beam search); paged rows share blocks."""
        self._reorder("beam_idx", beam_idx)

    def _reorder(self, name: str, order) -> None:
        order = self._order(name, order)
        for layer in self._others():  # transformers' own layers take the same row order
            layer.reorder_cache(order)
        if self.paged:
            if self.store is not None:
                self.store.reorder(order.tolist())
        else:
            for kv in self.kv:
                if kv is not None:
                    kv.k_cache, kv.v_cache = kv.k_cache[order], kv.v_cache[order]
                    kv.cache_seqlens = kv.cache_seqlens[order]
        if self.batch is not None:
            self.batch = len(order)

    def batch_select_indices(self, indices) -> None:
        """Keep rows ``indices`` (in that order)."""
        self._reorder("indices", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each row ``repeats`` times in place (row ``r`` becomes rows ``r * repeats ...``)."""
        repeats = check_int("repeats", repeats, low=1)
        if self.batch is not None:
            self._reorder("repeats", torch.arange(self.batch).repeat_interleave(repeats))

    def _order(self, name: str, order) -> torch.Tensor:
        if isinstance(order, torch.Tensor):
            if order.dim() != 1 or order.dtype.is_floating_point or order.dtype == torch.bool:
                raise ArgumentTypeError(f"{name} must be a 1-D integer tensor, got {order!r}")
            order = order.tolist()
        order = [check_int(f"{name}[{j}]", r, low=0) for j, r in enumerate(order)]
        batch = self.batch or 0
        if any(r >= batch for r in order):
            raise ArgumentError(f"{name} entries must lie in [0, {batch}) (the rows in use), got {order}")
        if len(order) > self.max_batch_size:
            raise ArgumentError(f"{name} asks for {len(order)} rows; max_batch_size is {self.max_batch_size}")
        return torch.tensor(order, dtype=torch.long, device=self.device)

    def reset(self) -> None:
        """Empty the cache for a new batch of any size up to ``max_batch_size``: contiguous storage is
        dropped (the next keys allocate it for their batch), paged rows free their blocks (the pools
        stay), and everything remembered from the last steps is forgotten."""
        for i, layer in self._attention():
            layer.length, layer.mode, layer.is_initialized = 0, None, False
            self.kv[i] = None
        for layer in self._others():
            layer.reset()
        if self.store is not None:
            for slot in list(self.store.seqs):
                self.store.free(slot)
        self.batch = self.rows = None
        forget(self)
        self.step_starts = self.step_counts = self.step_pads = self.step_table = None
        self.step_longest = 0
        self._last_call = self._starts = self._mask_pad = None

    def bytes_in_use(self) -> int:
        """Bytes of keys and values held by all layers: the whole reservation when contiguous, the
        blocks in use when paged."""
        if not self.paged:
            return sum(
                kv.k_cache.numel() * kv.k_cache.element_size() + kv.v_cache.numel() * kv.v_cache.element_size()
                for kv in self.kv
                if kv is not None
            )
        if self.store is None:
            return 0
        blocks = {b for seq in self.store.seqs.values() for b in seq.blocks}
        per_block = sum(p[0].numel() * p.element_size() for p in (*self.store.k_pools, *self.store.v_pools))
        return len(blocks) * per_block


__all__ = ["FlashKVCache", "FlashKVLayer"]
