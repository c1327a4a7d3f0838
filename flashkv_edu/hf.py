"""flashkv_edu inside Hugging Face transformers (notebook 10): an attention implementation and a cache.

    from flashkv_edu import hf
    name = hf.register()                            # attn_implementation="fkv_edu"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)
    cache = hf.FlashKVCache(model.config, max_batch_size=4, max_cache_len=512, page_size=16)
    out = model.generate(ids, attention_mask=mask, **hf.cache_kwargs(cache), max_new_tokens=32)

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from ``past_key_values``
to ``cache`` (the old name warns, and goes in 5.40 and 6.0): :func:`cache_kwargs` passes it under the
name the installed version takes.

What transformers passes to an attention function (after RoPE, after ``cache.update``): ``query``
``(batch, heads, q_len, head_dim)``, ``key``/``value`` ``(batch, kv_heads, kv_len, head_dim)``, the
padding ``attention_mask`` (2-D ``(batch, kv_len)`` bool, or None when nothing is padded, built by the
same mask function as FlashAttention 2's integration), ``scaling``, ``sliding_window`` (HF's ``W`` =
FlashAttention's ``window_size=(W - 1, 0)``), ``softcap`` and, for gpt-oss, the learnable sinks
``s_aux``. :func:`attention` maps them onto :func:`flashkv_edu.flash_attn_with_kvcache`: bottom-right
causal over each row's keys, left padding as ``cache_leftpad``.

:class:`FlashKVCache` is a thin adapter over the package's caches: one
:class:`~flashkv_edu.cache.KVCache` per layer (contiguous), or one
:class:`~flashkv_edu.paged.PagedKVCache` whose block tables serve every layer (paged). With this
module's attention its ``update`` writes nothing: it hands the new keys to the attention function,
which checks the call, writes them through the package's one write path and reads the cache in place.
transformers is an optional dependency: ``pip install 'flashkv_edu[hf]'``.
"""

from __future__ import annotations

import numbers
import weakref

import torch

from .api import flash_attn_with_kvcache, run_checked_call
from .cache import KVCache, write_kv
from .call import check_kvcache_call
from .paged import OutOfBlocksError, PagedKVCache, gather_paged
from .validation import (
    FLOAT_DTYPES,
    ArgumentError,
    ArgumentTypeError,
    check_int,
    check_positive,
    check_tensor,
    value_checks_on,
)

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

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""The ``config.layer_types`` a :class:`FlashKVCache` and :func:`attention` serve. Others (linear
attention, convolutions, chunked attention) are refused with a message naming the type."""


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


# --- the attention function ---------------------------------------------------------------------------

# Keyword arguments transformers passes that do not change the result of attention here.
_HARMLESS_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_router_logits",
        "position_embeddings",
        "layer_idx",
    }
)


def _left_padding(attention_mask, batch: int, kv_len: int, device) -> torch.Tensor | None:
    """Leading masked columns of each row of a 2-D padding mask ``(batch, kv_len)`` (None: no
    padding). Only left padding is FlashAttention's ``cache_leftpad``: anything else is refused."""
    if attention_mask is None:
        return None
    check_tensor("attention_mask", attention_mask)
    if attention_mask.dim() != 2:
        raise ArgumentError(
            f"the {NAME} attention takes transformers' 2-D padding mask, got shape {tuple(attention_mask.shape)}; "
            f"call flashkv_edu.hf.register() before building the model"
        )
    if tuple(attention_mask.shape) != (batch, kv_len):
        raise ArgumentError(
            f"attention_mask must have shape (batch, kv_len) = {(batch, kv_len)} (one column per cached or new "
            f"token), got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    pads = (mask.int().cumsum(-1) == 0).sum(-1)
    if bool((mask.sum(-1) != mask.shape[1] - pads).any()):
        raise ArgumentError(f"{NAME} supports left padding only (FlashAttention's cache_leftpad)")
    return pads.to(torch.int32) if bool(pads.any()) else None


_OPTIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (arguments, options)


def _attention_options(module, scaling, dropout, sliding_window, softcap, kwargs) -> dict:
    """transformers' attention arguments as ``flash_attn_with_kvcache`` keywords, every one checked:
    an argument that would change the result and is not implemented raises, naming it. A layer
    passes the same arguments at every step: their checked options are kept per module (not
    with a learnable sink, a tensor that may change)."""
    arguments = None
    if "s_aux" not in kwargs:
        given = tuple(sorted(k for k, v in kwargs.items() if v is not None))
        arguments = (scaling, dropout, sliding_window, softcap, kwargs.get("is_causal"), given, _BACKEND["name"])
        try:
            kept = _OPTIONS.get(module)
        except TypeError:  # a module that cannot be weakly referenced (None in a direct call)
            arguments = kept = None
        if kept is not None and kept[0] == arguments:
            return kept[1]
    options = _check_attention_options(module, scaling, dropout, sliding_window, softcap, dict(kwargs))
    if arguments is not None:
        _OPTIONS[module] = (arguments, options)
    return options


def _check_attention_options(module, scaling, dropout, sliding_window, softcap, kwargs) -> dict:
    """:func:`_attention_options` without the memory."""
    if dropout:
        raise ArgumentError(f"{NAME} attention has no dropout (got dropout={dropout}); use model.eval()")
    layer_types = getattr(getattr(module, "config", None), "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types and isinstance(layer_idx, int) and layer_idx < len(layer_types):
        kind = layer_types[layer_idx]
        if kind not in ATTENTION_LAYER_TYPES:
            raise ArgumentError(f"{NAME} attention serves {ATTENTION_LAYER_TYPES}; layer {layer_idx} is {kind!r}")
    sink = kwargs.pop("s_aux", None)  # gpt-oss's learnable sinks, one logit per query head
    if kwargs.get("is_causal") is False:
        raise ArgumentError(f"{NAME} attention is causal (a decoder's); got is_causal=False (an encoder?)")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS_KWARGS | {"is_causal"})
    if unknown:
        raise ArgumentError(
            f"{NAME} attention does not implement {', '.join(unknown)}: refusing rather than ignoring "
            "what would change the result"
        )
    if sliding_window is not None:
        sliding_window = check_int("sliding_window (the model's)", sliding_window, low=1)
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    scale = None if scaling is None else check_positive("scaling (the model's)", scaling)
    cap = check_positive("softcap (the model's)", float(softcap or 0.0), allow_zero=True)
    options = dict(softmax_scale=scale, causal=True, window_size=window, softcap=cap, backend=_BACKEND["name"])
    if sink is not None:
        options["learnable_sink"] = sink.detach()
    return options


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
    Returns ``(out (batch, q_len, heads, head_dim_v), None)``.

    With a :class:`FlashKVCache` the new keys arrive here unwritten: they are written into the
    cache and attention reads the cache in place. With any other cache (``DynamicCache``) ``key``
    and ``value`` are the whole history."""
    options = _attention_options(module, scaling, dropout, sliding_window, softcap, kwargs)
    check_tensor("query", query, ndim=4)
    q = query.transpose(1, 2)
    pending = _PENDING.pop(id(key), None)
    if pending is not None and pending[1] is key and pending[2] is value:
        cache, layer_idx = pending[0], pending[3]
        _CONSUMED[id(key)] = key
        return cache._attend(layer_idx, q, key, value, attention_mask, options), None
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    if _CONSUMED.get(id(key)) is key:
        raise ArgumentError(
            "this model hands one layer's new keys to another layer's attention (shared KV layers): "
            "FlashKVCache cannot serve it; use transformers' DynamicCache"
        )
    _settle_transformed(module, key, attention_mask, q.device)
    k, v = key.transpose(1, 2), value.transpose(1, 2)
    b, kv_len = q.shape[0], k.shape[1]
    pad = _left_padding(attention_mask, b, kv_len, q.device)
    seqlens = torch.full((b,), kv_len, dtype=torch.int32, device=q.device)
    return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, cache_leftpad=pad, **options), None


def register(backend: str = "auto") -> str:
    """Register the attention function (and FlashAttention 2's padding-mask builder) under
    :data:`NAME` (and the earlier :data:`ALIAS`); ``backend`` is the :func:`flash_attn_with_kvcache`
    backend it uses. Returns the name to pass as ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from .runtime import BACKENDS

    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _BACKEND["name"] = backend
    for name in (NAME, ALIAS):
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, flash_attention_mask)
    _skip_flash_kernel_preload()
    _serve_falcon()
    return NAME


def _serve_falcon() -> None:
    """Falcon computes attention inline (eager or SDPA) and picks its attention class from a table
    keyed by the implementation name, ``FALCON_ATTENTION_CLASSES``; it never calls an attention
    function, so there is no public route in. For :data:`NAME` the table gets
    :class:`FalconAttention` 's sibling below, which projects, rotates and caches exactly as
    Falcon does and then calls :func:`attention`."""
    try:
        from transformers.models.falcon import modeling_falcon as mf
    except ImportError:  # pragma: no cover - a transformers without Falcon
        return
    if NAME in mf.FALCON_ATTENTION_CLASSES:
        return

    class FalconFlashKVAttention(mf.FalconAttention):
        def forward(
            self,
            hidden_states,
            alibi,
            attention_mask,
            position_ids=None,
            layer_past=None,
            use_cache=False,
            output_attentions=False,
            position_embeddings=None,
            **kwargs,
        ):
            if alibi is not None:
                raise ArgumentError(f"{NAME} serves Falcon with rotary positions; this one uses ALiBi (alibi=True)")
            if output_attentions:
                raise ArgumentError(f"{NAME} attention returns no attention weights (output_attentions=True)")
            q, k, v = self._split_heads(self.query_key_value(hidden_states))
            b, s = q.shape[:2]
            kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
            q = q.transpose(1, 2).reshape(b, self.num_heads, s, self.head_dim)
            k = k.transpose(1, 2).reshape(b, kv_heads, s, self.head_dim)
            v = v.transpose(1, 2).reshape(b, kv_heads, s, self.head_dim)
            cos, sin = position_embeddings
            q, k = mf.apply_rotary_pos_emb(q, k, cos, sin)
            if layer_past is not None:
                k, v = layer_past.update(k, v, self.layer_idx)
            dropout = self.config.attention_dropout if self.training else 0.0
            out, _ = attention(self, q, k, v, attention_mask, scaling=self.head_dim**-0.5, dropout=dropout)
            return self.dense(out.reshape(b, s, self.num_heads * self.head_dim)), None

    mf.FALCON_ATTENTION_CLASSES[NAME] = FalconFlashKVAttention


def _skip_flash_kernel_preload() -> None:
    """For the alias "flashkv_edu" only: transformers treats every implementation whose name
    contains "flash" as a FlashAttention kernel and preloads one (from the ``flash_attn`` package
    or its kernel hub) when a model is built; its loader is told to load nothing for the alias.
    :data:`NAME` needs none of this (and where the loader differs, the alias is simply not served)."""
    from transformers import modeling_flash_attention_utils as fa_utils

    load = getattr(fa_utils, "_lazy_imports", None)
    if load is None or getattr(load, "_flashkv_wrapped", False) or not hasattr(fa_utils, "_process_flash_kwargs_fn"):
        return

    def lazy_imports(implementation, *args, **kwargs):
        if implementation == ALIAS:
            return None, None, None, fa_utils._pad_input, fa_utils._unpad_input
        return load(implementation, *args, **kwargs)

    lazy_imports._flashkv_wrapped = True
    fa_utils._lazy_imports = lazy_imports


# --- the cache -----------------------------------------------------------------------------------------

# New keys handed from FlashKVCache.update to attention: id(key) -> (cache, key, value, layer).
_PENDING: dict[int, tuple] = {}
# New keys already written and attended to (a second attention over them means shared KV layers).
_CONSUMED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _settle_transformed(module, key, attention_mask, device) -> None:
    """The dense path met a key that is not what a FlashKVCache handed out. If a cache still holds
    unwritten keys for this layer, the model transformed them before attention (DeepSeek's MLA
    caches latents and expands them after ``update``): on that cache's first pass nothing else
    is cached, so the model's keys are the whole history. The pending latents are written now and
    the cache switches that layer to transformers' way (write in ``update``, return the history).
    Later on, an in-place layer meeting such a key is an error, never a silent wrong result."""
    layer_idx = getattr(module, "layer_idx", None)
    waiting = [(k, e) for k, e in _PENDING.items() if layer_idx is None or e[3] == layer_idx]
    if not waiting:
        return
    if layer_idx is None:
        raise ArgumentError(f"{NAME} attention cannot tell which cache layer this module is (it has no layer_idx)")
    for entry_key, (cache, key_states, value_states, i) in waiting:
        del _PENDING[entry_key]
        cache._settle(i, key_states, value_states, attention_mask, device)


class FlashKVLayer(CacheLayerMixin):
    """One layer of :class:`FlashKVCache`: transformers' view of it (a length, mask sizes). The keys
    and values live in the cache's package caches; ``update`` hands them to the cache."""

    is_sliding = False  # every token is kept; a window is applied by the mask
    is_compileable = False
    is_croppable = True

    def __init__(self, cache: FlashKVCache, index: int):
        super().__init__()
        self.cache, self.index = cache, index
        self.length = 0  # tokens per row as transformers counts them (left padding included)
        # How this layer meets the attention: None until its first pass, "in_place" when the model
        # hands update's tensors straight to attention, "history" when it transforms them first.
        self.mode = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.cache._initialize(self.index, key_states, value_states)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache._update(self.index, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.cache.max_cache_len

    def _whole_cache(self, what: str):
        raise NotImplementedError(f"call FlashKVCache.{what} (the cache's layers share their storage)")

    def crop(self, tokens_to_remove: int) -> None:
        self._whole_cache("crop")

    def reorder_cache(self, beam_idx) -> None:
        self._whole_cache("reorder_cache")

    def batch_select_indices(self, indices) -> None:
        self._whole_cache("batch_select_indices")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._whole_cache("batch_repeat_interleave")

    def reset(self) -> None:
        self._whole_cache("reset")


class FlashKVCache(Cache):
    """A transformers ``Cache`` storing keys and values in FlashAttention's layout, through the
    package's caches.

    ``config``: the model's config (one layer per attention layer; ``config.layer_types`` other than
    full or sliding attention are refused, naming the type); ``max_batch_size`` sequences (beams
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
        for i, kind in enumerate(getattr(text, "layer_types", None) or []):
            if kind not in ATTENTION_LAYER_TYPES:
                raise ArgumentError(
                    f"FlashKVCache holds keys and values of attention layers; layer {i} of this model is {kind!r}. "
                    f"Use transformers' own cache (DynamicCache) with attn_implementation={NAME!r}"
                )
        if getattr(text, "num_kv_shared_layers", 0):
            raise ArgumentError(
                f"this model shares keys and values across layers (num_kv_shared_layers="
                f"{text.num_kv_shared_layers}): FlashKVCache cannot serve it; use transformers' DynamicCache"
            )
        super().__init__(layers=[FlashKVLayer(self, i) for i in range(layers)])
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

    # --- storage -------------------------------------------------------------------------------------

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    def _ours(self) -> bool:
        return getattr(self.config, "_attn_implementation", None) in (NAME, ALIAS)

    def _initialize(self, i: int, key_states, value_states) -> None:
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
        if self.paged and self.store is not None:  # later layers of a pass: the lengths before it
            if i > 0 and self.step_starts is not None:
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

    def _lengths(self) -> torch.Tensor:
        """Paged: tokens stored per row of this step."""
        return self.store.cache_seqlens[self._rows()]

    def _update(self, i: int, key_states, value_states):
        """transformers' ``cache.update``. With this module's attention: nothing is written, the new
        keys go to :func:`attention` unchanged. Otherwise: written now, the whole history returned."""
        self._check_states(i, key_states, value_states)
        if self._ours() and self.layers[i].mode != "history":  # the attention writes, once it checked the mask
            for key, entry in list(_PENDING.items()):  # a pass that never reached attention
                if entry[0] is self and entry[3] == i:
                    del _PENDING[key]
            _PENDING[id(key_states)] = (self, key_states, value_states, i)
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
        if i == 0 or self.step_starts is None:  # the first layer of a pass reserves for all layers
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
        need = sum(store._plan(store._slot(r), int(n))[0] for r, n in zip(rows, counts.tolist(), strict=True))
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

    def _settle(self, i: int, key_states, value_states, attention_mask, device) -> None:
        """Layer ``i``'s model transformed the keys between ``update`` and attention (see
        :func:`_settle_transformed`): write its pending keys (left padding dropped when paged) and
        serve it transformers' way from now on."""
        layer = self.layers[i]
        if layer.mode == "in_place":
            raise ArgumentError(
                f"layer {i} was read in place, and now its attention got keys the cache did not hand out: "
                "this model transforms the cached keys; use transformers' DynamicCache"
            )
        b, s = key_states.shape[0], key_states.shape[2]
        pad = _left_padding(attention_mask, b, layer.length + s, device) if attention_mask is not None else None
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        new_pad = None
        if self.paged and pad is not None:
            new_pad = (pad - layer.length).clamp(0, s).to(torch.int32)
            new_pad = new_pad if bool(new_pad.any()) else None
        self._write(i, key_states.transpose(1, 2), value_states.transpose(1, 2), new_pad)
        layer.mode = "history"

    def _attend(self, i: int, q, key_states, value_states, attention_mask, options):
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
                if i == 0 or self.step_starts is None:
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
            return flash_attn_with_kvcache(
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
        return flash_attn_with_kvcache(
            q, *pools, cache_seqlens=ends, cache_batch_idx=rows, cache_leftpad=pad, **options
        )

    def _padding(self, attention_mask, b: int, kv_len: int, device):
        """:func:`_left_padding`, read once per mask: every layer of a pass gets the same mask."""
        memo = self._mask_pad
        if memo is not None and memo[0] is attention_mask and memo[1] == (b, kv_len, device):
            return memo[2]
        pad = _left_padding(attention_mask, b, kv_len, device)
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
        length = self.layers[0].length
        remove = -n if n <= 0 else max(length - n, 0)
        if remove > length:
            raise ArgumentError(f"cannot remove {remove} tokens from a cache holding {length}")
        if remove == 0:
            return
        for i, layer in enumerate(self.layers):
            layer.length -= remove
            if not self.paged and self.kv[i] is not None:
                self.kv[i].cache_seqlens -= remove
        if self.paged and self.store is not None:
            for slot, seq in list(self.store.seqs.items()):
                self.store.truncate(slot, max(seq.length - remove, 0))

    def reorder_cache(self, beam_idx) -> None:
        """Row ``j`` becomes what row ``beam_idx[j]`` was (beam search); paged rows share blocks."""
        self._reorder("beam_idx", beam_idx)

    def _reorder(self, name: str, order) -> None:
        order = self._order(name, order)
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
        for i, layer in enumerate(self.layers):
            layer.length, layer.mode = 0, None
            if self.kv[i] is not None:
                self.kv[i].reset()
        if self.store is not None:
            for slot in list(self.store.seqs):
                self.store.free(slot)
        self.step_starts = self.step_counts = self.step_pads = None

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


# --- serving ---------------------------------------------------------------------------------------------


def _check_prompts(model, prompts) -> list[list[int]]:
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
    prompts = _check_prompts(model, prompts)
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
        register(_BACKEND["name"])
    return AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True
    ).eval()


__all__ = [
    "ALIAS",
    "CACHE_ARGUMENT",
    "NAME",
    "FlashKVCache",
    "FlashKVLayer",
    "attention",
    "cache_kwargs",
    "load_local",
    "register",
    "serve",
    "transformers",
]
