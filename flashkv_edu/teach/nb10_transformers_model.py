"""Notebook 10: tiny transformers models, what the attention function receives, memory over a
generation, the continuous-batching picture, exercise checks and their solutions."""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

import flashkv_edu as fk

from .. import hf
from ..reference import attention_mask
from .exercise import CaseFailed, Exercise, call_unchanged, expect_equal, run_check

EXERCISES = [
    Exercise("10", "hf_window_size", "check_hf_window_size", 10),
    Exercise("10", "my_hf_attention", "check_my_hf_attention", 25),
]

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=None,  # no special tokens: every id is an ordinary character of the 128
    eos_token_id=None,
    pad_token_id=0,
)


ALTERNATING = ["sliding_attention", "full_attention"]

# Tiny random-weight configurations of decoder architectures: (model_type, overrides of COMMON).
# Windows of 8 tokens and two layers of different kinds, so every feature shows in 36 tokens.
ARCHITECTURES = {
    "llama": ("llama", {}),
    "llama3 rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=64))),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "mistral": ("mistral", dict(sliding_window=8)),
    "mixtral": ("mixtral", dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=8, attn_logit_softcapping=5.0, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, layer_types=ALTERNATING)),
    "gemma4 (head_dim 512)": ("gemma4_text", dict(head_dim=16, global_head_dim=512, sliding_window=8,
                                                  layer_types=ALTERNATING, hidden_size_per_layer_input=16,
                                                  vocab_size_per_layer_input=128)),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "gpt-neox": ("gpt_neox", dict(rotary_pct=0.5)),
    "starcoder2": ("starcoder2", dict(sliding_window=8)),
    "cohere2": ("cohere2", dict(sliding_window=8, layer_types=ALTERNATING)),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, bias=False)),
    "gpt-oss (sinks)": ("gpt_oss", dict(head_dim=16, sliding_window=8, layer_types=ALTERNATING,
                                        num_local_experts=4, num_experts_per_tok=2,
                                        rope_parameters=dict(rope_type="yarn", factor=8.0, beta_fast=32.0,
                                                             beta_slow=1.0, truncate=False,
                                                             original_max_position_embeddings=64,
                                                             rope_theta=150000.0))),
    "deepseek-v3 (MLA)": ("deepseek_v3", dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None,
                                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                              first_k_dense_replace=1, moe_intermediate_size=64,
                                              rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                                   original_max_position_embeddings=64, beta_fast=32,
                                                                   beta_slow=1, mscale=1.0, mscale_all_dim=1.0))),
}  # fmt: skip


def tiny_config(kind: str = "gemma2"):
    """A small random-weight config of one of :data:`ARCHITECTURES` (``"llama"``, ``"qwen2"``,
    ``"mistral"`` (window 8), ``"gemma2"`` (alternating window-8 and global layers, logit
    softcap 5), ...)."""
    from transformers import AutoConfig

    model_type, overrides = ARCHITECTURES[kind]
    return AutoConfig.for_model(model_type, **{**COMMON, **overrides})


def model_pair(kind: str = "gemma2", seed: int = 0):
    """(eager model, flashkv_edu model) of one tiny config, with the same random weights."""
    from transformers import AutoModelForCausalLM

    hf.register()
    torch.manual_seed(seed)
    # One config object each: from_config records the implementation on the config it is given.
    eager = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_config(tiny_config(kind), attn_implementation=hf.NAME).eval()
    ours.load_state_dict(eager.state_dict())
    assert eager.config._attn_implementation == "eager" and ours.config._attn_implementation == hf.NAME
    return eager, ours


def record_calls(model, ids, mask, cache):
    """Run one prefill and one decode step, recording what the attention function receives:
    a list of dicts (layer, query/key shapes, mask shape, sliding_window, softcap, scaling)."""
    from transformers import AttentionInterface

    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(
            dict(
                layer=module.layer_idx,
                query=tuple(query.shape),
                key=tuple(key.shape),
                mask=None if attention_mask is None else tuple(attention_mask.shape),
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
                scaling=kwargs.get("scaling"),
            )
        )
        return hf.attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(hf.NAME, spy)
    try:
        out = model(input_ids=ids, attention_mask=mask, **hf.cache_kwargs(cache), use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), **hf.cache_kwargs(cache))
    finally:
        AttentionInterface.register(hf.NAME, hf.attention)
    return seen


def dynamic_cache_bytes(cache) -> int:
    """Bytes held by a transformers ``DynamicCache``'s keys and values."""
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers if layer.keys is not None)


@torch.no_grad()
def memory_over_generation(model, ids, mask, steps: int, capacity: int, page_size: int = 16):
    """Greedy decoding of a left-padded batch with three caches side by side; bytes each holds
    after every step: ``{"DynamicCache": [...], "FlashKVCache contiguous": [...], "FlashKVCache
    paged": [...]}``, and whether all three produced the same tokens."""
    from transformers import DynamicCache

    caches = {
        "DynamicCache": DynamicCache(config=model.config),
        "FlashKVCache contiguous": hf.FlashKVCache(model.config, ids.shape[0], capacity),
        "FlashKVCache paged": hf.FlashKVCache(model.config, ids.shape[0], capacity, page_size=page_size),
    }
    sizes = {k: [] for k in caches}
    tokens = {}
    for name, cache in caches.items():
        cur, m, out = ids, mask, []
        for _ in range(steps):
            logits = model(input_ids=cur, attention_mask=m, **hf.cache_kwargs(cache), use_cache=True).logits
            cur = logits[:, -1:].argmax(-1)
            out.append(cur)
            m = torch.cat([m, torch.ones_like(cur)], 1)
            sizes[name].append(dynamic_cache_bytes(cache) if name == "DynamicCache" else cache.bytes_in_use())
        tokens[name] = torch.cat(out, 1)
    same = all(torch.equal(t, tokens["DynamicCache"]) for t in tokens.values())
    return sizes, same


def draw_memory(sizes: dict, title: str):
    fig, ax = plt.subplots(figsize=(10, 4))
    for name, ys in sizes.items():
        ax.plot(range(1, len(ys) + 1), [y / 1024 for y in ys], label=name)
    ax.set_xlabel("decode step")
    ax.set_ylabel("KiB of keys and values")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def draw_serving(trace, prompts, budgets):
    """Which requests run at each decode step (labelled with their prompt length and token
    budget), and the blocks in use."""
    n = len(prompts)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 5), sharex=True, height_ratios=[2, 1])
    for step, running, _ in trace:
        ax.scatter([step] * len(running), running, s=16, color="tab:blue")
    ax.set_ylabel("request")
    ax.set_yticks(
        range(n), [f"{i}: prompt {len(p)}, {b} new" for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))]
    )
    ax.set_title("Continuous batching over a transformers model (paged FlashKVCache, at most 3 rows)")
    ax2.plot([t[0] for t in trace], [t[2] for t in trace], color="tab:orange")
    ax2.set_xlabel("decode step")
    ax2.set_ylabel("blocks in use\n(each layer)")
    fig.tight_layout()
    return fig


def architecture_table(new_tokens: int = 24):
    """Every configuration of :data:`ARCHITECTURES` generating greedily for a left-padded batch of
    3, eager attention + DynamicCache against flashkv_edu with FlashKVCache contiguous and paged:
    ``{kind: (tokens equal?, largest first-step logit difference)}``."""
    from transformers import DynamicCache

    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4], mask[2, :7] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
               return_dict_in_generate=True, attention_mask=mask)  # fmt: skip
    rows = {}
    for kind in ARCHITECTURES:
        eager, ours = model_pair(kind)
        want = eager.generate(ids, **gen, **hf.cache_kwargs(DynamicCache(config=eager.config)))
        same, worst = True, 0.0
        for page in (None, 4):
            got = ours.generate(ids, **gen, **hf.cache_kwargs(hf.FlashKVCache(ours.config, 3, 64, page_size=page)))
            same &= torch.equal(got.sequences, want.sequences)
            worst = max(worst, float((got.logits[0] - want.logits[0]).abs().max()))
        rows[kind] = (same, worst)
    return rows


# --- exercise 1: the window ----------------------------------------------------------------------


def hf_window_size(sliding_window):
    """transformers' ``sliding_window`` (None, or W keys counting the current one) as
    FlashAttention's ``window_size`` with ``causal=True``."""
    return (-1, -1) if sliding_window is None else (sliding_window - 1, 0)


def check_hf_window_size(fn) -> bool | None:
    """The mask FlashAttention builds from the answer equals transformers' own sliding mask."""
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    def case(w, sq, sk):
        def run(f):
            got = f(w)
            if not (isinstance(got, (tuple, list)) and len(got) == 2):
                raise CaseFailed(f"return a (left, right) pair, got {got!r}")
            got = tuple(got)  # FlashAttention takes a tuple or a list
            rule = causal_mask_function if w is None else sliding_window_causal_mask_function(w)
            offset = sk - sq
            q_idx, kv_idx = torch.arange(sq)[:, None] + offset, torch.arange(sk)[None, :]
            want = rule(torch.tensor(0), torch.tensor(0), q_idx, kv_idx).expand(sq, sk)
            ours = attention_mask(sq, sk, causal=True, window_size=got)
            if not torch.equal(ours, want):
                i, j = (ours != want).nonzero()[0].tolist()
                raise CaseFailed(
                    f"window_size={got}: query {i} (position {i + offset}) and key {j}: transformers says "
                    f"{'visible' if want[i, j] else 'hidden'}, yours {'visible' if ours[i, j] else 'hidden'}"
                )

        return f"sliding_window={w}, {sq} queries over {sk} keys", run

    cases = [case(None, 5, 5), case(4, 8, 8), case(1, 3, 6), case(8, 1, 20), case(3, 4, 10), case(2, 1, 1)]
    return run_check("check_hf_window_size", fn, cases, "no window, windows of 1, 3, 4 and 8, prefill and decode")


# --- exercise 2: the attention function ------------------------------------------------------------


def my_hf_attention(query, key, value, attention_mask, scaling, sliding_window, softcap):
    """transformers' attention arguments -> ``flash_attn_with_kvcache`` -> transformers' output.

    query ``(b, heads, q_len, d)``, key/value ``(b, kv_heads, kv_len, d)`` (the whole history),
    attention_mask None or 2-D bool ``(b, kv_len)`` with left padding. Returns ``(b, q_len, heads, d)``."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    b, kv_len = k.shape[:2]
    pad = None
    if attention_mask is not None:
        pad = (attention_mask.int().cumsum(-1) == 0).sum(-1).to(torch.int32)
    return fk.flash_attn_with_kvcache(
        q,
        k,
        v,
        cache_seqlens=torch.full((b,), kv_len, dtype=torch.int32),
        cache_leftpad=pad,
        softmax_scale=scaling,
        causal=True,
        window_size=(-1, -1) if sliding_window is None else (sliding_window - 1, 0),
        softcap=softcap or 0.0,
    )


def check_my_hf_attention(fn) -> bool | None:
    """Against the package's transformers integration on random inputs."""

    def case(label, b, h, hk, sq, sk, pads, window, softcap, seed):
        def run(f):
            g = torch.Generator().manual_seed(seed)
            q = torch.randn(b, h, sq, 16, generator=g)
            k, v = torch.randn(b, hk, sk, 16, generator=g), torch.randn(b, hk, sk, 16, generator=g)
            mask = None
            if pads is not None:
                mask = torch.ones(b, sk, dtype=torch.bool)
                for i, p in enumerate(pads):
                    mask[i, :p] = False
            args = (q, k, v, mask, 0.3, window, softcap)
            want, _ = hf.attention(None, *args[:4], scaling=0.3, sliding_window=window, softcap=softcap)
            got = call_unchanged(f, *args)
            expect_equal("output shape (b, q_len, heads, d)", tuple(want.shape), tuple(getattr(got, "shape", ())))
            err = float((got - want).abs().max())
            if err > 1e-5:
                idx = tuple(((got - want).abs() > 1e-5).nonzero()[0].tolist())
                raise CaseFailed(f"at (batch, query, head, dim) = {idx}: expected {want[idx]:.5g}, got {got[idx]:.5g}")

        return label, run

    cases = [
        case("prefill, GQA, no padding", 1, 4, 2, 6, 6, None, None, None, 0),
        case("decode step with left padding", 3, 4, 2, 1, 9, [0, 3, 5], None, None, 1),
        case("prefill, sliding_window=3, left padding", 2, 4, 1, 7, 7, [0, 2], 3, None, 2),
        case("decode, window 4 and softcap 5", 2, 2, 2, 1, 12, [1, 0], 4, 5.0, 3),
    ]
    return run_check("check_my_hf_attention", fn, cases, "layouts, padding, windows and softcap")
