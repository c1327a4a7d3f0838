"""flashkv_edu inside transformers: tiny random models of 17 decoder architectures (Llama with and
without llama3 RoPE scaling, Qwen2/3, Mistral and Mixtral (sliding window), Gemma 2/3/4 (windows,
softcap, a 512-wide global head), Phi-3, OLMo2, GPT-NeoX, Starcoder2, Cohere2, Falcon, gpt-oss
(learnable sinks), DeepSeek-V3 (MLA: keys and values of different widths)) generate token for token
what transformers' eager attention with its DynamicCache generates, first-step logits within 1e-4 in
fp32, for one prompt and a left-padded batch of 3, with transformers' DynamicCache and with
contiguous and paged FlashKVCache. Beam search and assisted generation too. No downloads: models
are built from small configs with random weights."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

from flashkv_edu import hf
from flashkv_edu.hf import cache as hf_cache
from flashkv_edu.teach import nb10_transformers_model as nb10
from flashkv_edu.validation import ArgumentError

hf_attention = importlib.import_module("flashkv_edu.hf.attention")  # the module (hf.attention is the function)

CONFIGS = tuple(nb10.ARCHITECTURES)  # tiny random-weight configs of notebook 10
NEW_TOKENS = 24


def _pair(name):
    """(eager model, flashkv_edu model) with the same random weights, PyTorch backend."""
    eager, ours = nb10.model_pair(name)
    hf.register("torch")
    return eager, ours


def _prompts(batch):
    ids = torch.randint(3, 128, (batch, 12), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    if batch == 3:  # left padding, as generate() pads a ragged batch
        mask[1, :4] = 0
        mask[2, :7] = 0
        ids[mask == 0] = 0
    return ids, mask


def _generate(model, ids, mask, cache):
    return model.generate(
        ids,
        attention_mask=mask,
        **hf.cache_kwargs(cache),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )


@pytest.mark.parametrize("batch", [1, 3], ids=["one-prompt", "left-padded-3"])
@pytest.mark.parametrize("name", CONFIGS)
def test_generation_equals_eager_attention_with_a_dynamic_cache(name, batch):
    eager, ours = _pair(name)
    ids, mask = _prompts(batch)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config))
    caches = {
        "contiguous": hf.FlashKVCache(ours.config, batch, 64),
        "paged": hf.FlashKVCache(ours.config, batch, 64, page_size=4),
        "DynamicCache": DynamicCache(config=ours.config),
    }
    assert ours.config._attn_implementation == hf.NAME
    for label, cache in caches.items():
        got = _generate(ours, ids, mask, cache)
        assert torch.equal(got.sequences, want.sequences), label
        err = (got.logits[0] - want.logits[0]).abs().max().item()  # the first step's logits
        assert err < 1e-4, (label, err)


def test_the_window_is_honoured_and_an_off_by_one_is_caught(monkeypatch):
    """Mistral's window of 8 matters over 36 tokens: widening it by one changes the logits."""
    eager, ours = _pair("mistral")
    ids, mask = _prompts(1)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config))
    right = hf.attention

    def w_plus_one(module, q, k, v, m, sliding_window=None, **kw):
        return right(module, q, k, v, m, sliding_window=sliding_window + 1, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register(hf.NAME, w_plus_one)
    try:
        got = _generate(ours, ids, mask, hf.FlashKVCache(ours.config, 1, 64))
    finally:
        AttentionInterface.register(hf.NAME, right)
    assert max((a - b).abs().max().item() for a, b in zip(got.logits, want.logits, strict=True)) > 1e-3


def test_triton_backend_generates_the_same_tokens():
    eager, ours = _pair("gemma2")
    ids, mask = _prompts(3)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config))
    hf.register("triton")
    try:
        got = _generate(ours, ids, mask, hf.FlashKVCache(ours.config, 3, 64, page_size=16))
    finally:
        hf.register("torch")
    assert torch.equal(got.sequences, want.sequences)


def test_paged_cache_holds_only_the_blocks_it_needs():
    _, ours = _pair("llama")
    ids, mask = _prompts(3)
    contiguous = hf.FlashKVCache(ours.config, 3, 256)
    paged = hf.FlashKVCache(ours.config, 3, 256, page_size=4)
    _generate(ours, ids, mask, contiguous)
    _generate(ours, ids, mask, paged)
    d, hk, layers = 16, 2, 2
    per_token = 2 * layers * hk * d * 4
    assert contiguous.bytes_in_use() == 3 * 256 * per_token
    lengths = [12 + NEW_TOKENS - 1 - p for p in (0, 4, 7)]  # the last token is never appended
    assert paged.bytes_in_use() == sum(-(-n // 4) * 4 for n in lengths) * per_token


def test_right_padding_and_dropout_are_refused():
    eager, ours = _pair("llama")
    ids, mask = _prompts(3)
    mask = mask.flip(1)
    with pytest.raises(ArgumentError, match="left padding only"):
        _generate(ours, ids, mask, hf.FlashKVCache(ours.config, 3, 64))
    with pytest.raises(ArgumentError, match="dropout"):
        hf.attention(
            None, torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), None, dropout=0.1
        )
    with pytest.raises(ArgumentError, match="max_cache_len"):
        _generate(ours, *_prompts(1), hf.FlashKVCache(ours.config, 1, 20))


def test_without_transformers_the_package_imports_and_hf_says_how_to_install():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import flashkv_edu\n"
        "try:\n    import flashkv_edu.hf\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'flashkv_edu[hf]'" in out.stdout


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_continuous_batching_equals_generating_each_request_alone(name):
    """Requests join and leave between steps; every output equals eager generate() alone."""
    eager, ours = _pair(name)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 9, 30, 12, 3)]
    budget = [20, 6, 25, 9, 14, 24]
    outputs, trace = hf.serve(ours, prompts, budget, max_batch=3, page_size=4)
    for p, n, out in zip(prompts, budget, outputs, strict=True):
        want = eager.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert out == want[0, len(p) :].tolist()
    running = [set(r) for _, r, _ in trace]
    assert max(len(r) for r in running) == 3 and any(a != b for a, b in zip(running, running[1:], strict=False))
    assert trace[-1][2] <= 3 * -(-(30 + 25) // 4)  # blocks are returned when requests leave


def test_the_readme_example_runs(tmp_path):
    """The README's transformers example, as a user would paste it into a fresh Python."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## In a Hugging Face transformers model") :]
    code = section[section.index("```python\n") + 10 : section.index("```", section.index("```python\n") + 10)]
    code += "\nassert out.shape == (2, 5 + 24)\nprint('ok')\n"
    run = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]
    assert "deprecated" not in run.stderr.lower(), run.stderr[-2000:]  # transformers' own logger warnings too


def test_the_cache_goes_under_the_name_the_installed_transformers_takes():
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in
    5.40); ``hf.cache_kwargs`` uses the installed version's name, and no call warns: not as a
    FutureWarning (an error here) and not through transformers' own logger."""
    import io
    import logging
    import warnings

    from packaging.version import Version

    installed = Version(hf.transformers.__version__)
    assert hf.CACHE_ARGUMENT == ("cache" if installed >= Version("5.24") else "past_key_values")
    _, ours = _pair("llama")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cache = hf.FlashKVCache(ours.config, 1, 64)
            out = ours(input_ids=torch.tensor([[3, 4, 5]]), use_cache=True, **hf.cache_kwargs(cache))
            assert getattr(out, hf.CACHE_ARGUMENT) is cache
            _generate(ours, *_prompts(1), hf.FlashKVCache(ours.config, 1, 64))
            hf.serve(ours, [[3, 4, 5]], 3)
    finally:
        logger.removeHandler(handler)
    assert "deprecated" not in stream.getvalue().lower(), stream.getvalue()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_batch_size=0, max_cache_len=64), "max_batch_size"),
        (dict(max_batch_size=1, max_cache_len=0), "max_cache_len"),
        (dict(max_batch_size=1, max_cache_len=64, page_size=0), "page_size"),
    ],
)
def test_flashkv_cache_arguments_are_checked(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        hf.FlashKVCache(nb10.tiny_config("llama"), **kwargs)


def test_register_refuses_an_unknown_backend_and_serve_needs_the_implementation():
    with pytest.raises(ArgumentError, match="backend"):
        hf.register("cuda")
    eager, _ = _pair("llama")
    with pytest.raises(ArgumentError, match="attn_implementation"):
        hf.serve(eager, [[1, 2, 3]], 2)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_beam_search_equals_eager(name, page_size):
    """num_beams=3 reorders the cache every step (reorder_cache): paged rows share blocks and
    copy a shared last block on write; the beams equal eager attention's."""
    eager, ours = _pair(name)
    ids, mask = _prompts(3)
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    want = eager.generate(ids, **kw, **hf.cache_kwargs(DynamicCache(config=eager.config)))
    got = ours.generate(ids, **kw, **hf.cache_kwargs(hf.FlashKVCache(ours.config, 9, 64, page_size=page_size)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
def test_assisted_generation_equals_eager(page_size):
    """generate(assistant_model=...) verifies the draft's tokens and crops the rejected ones from
    the main model's cache (crop): the result is eager's greedy output."""
    eager, ours = _pair("llama")
    torch.manual_seed(7)
    from transformers import AutoModelForCausalLM

    draft = AutoModelForCausalLM.from_config(nb10.tiny_config("llama"), attn_implementation="eager").eval()
    ids, _ = _prompts(1)
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    want = eager.generate(ids, **kw)
    got = ours.generate(
        ids, assistant_model=draft, **kw, **hf.cache_kwargs(hf.FlashKVCache(ours.config, 1, 64, page_size=page_size))
    )
    assert torch.equal(got, want)


def test_crop_and_row_selection_leave_what_eager_would_see():
    """crop(-n) then regenerate equals never having generated; batch_select_indices keeps rows."""
    _, ours = _pair("llama")
    ids, mask = _prompts(3)
    for page_size in (None, 4):
        cache = hf.FlashKVCache(ours.config, 3, 64, page_size=page_size)
        first = ours(input_ids=ids, attention_mask=mask, use_cache=True, **hf.cache_kwargs(cache)).logits[:, -1]
        extra = torch.tensor([[5], [6], [7]])
        ours(input_ids=extra, attention_mask=torch.cat([mask, torch.ones_like(extra)], 1), use_cache=True,
             **hf.cache_kwargs(cache))  # fmt: skip
        cache.crop(-1)
        assert cache.get_seq_length() == 12
        again = ours(input_ids=extra, attention_mask=torch.cat([mask, torch.ones_like(extra)], 1), use_cache=True,
                     **hf.cache_kwargs(cache)).logits[:, -1]  # fmt: skip
        fresh = hf.FlashKVCache(ours.config, 3, 64, page_size=page_size)
        ours(input_ids=ids, attention_mask=mask, use_cache=True, **hf.cache_kwargs(fresh))
        want = ours(input_ids=extra, attention_mask=torch.cat([mask, torch.ones_like(extra)], 1), use_cache=True,
                    **hf.cache_kwargs(fresh)).logits[:, -1]  # fmt: skip
        torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)
        assert first.shape == (3, 128)
        cache.batch_select_indices(torch.tensor([2, 0]))
        assert cache.batch == 2


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
def test_a_reset_cache_serves_a_batch_of_another_size(page_size):
    """generate on a batch of 3, reset(), then a batch of 1 in the same cache (max_batch_size 3):
    the tokens equal eager's with a fresh cache, and a paged reset frees every block."""
    eager, ours = _pair("llama")
    cache = hf.FlashKVCache(ours.config, 3, 64, page_size=page_size)
    ids, mask = _prompts(3)
    first = _generate(ours, ids, mask, cache).sequences
    assert torch.equal(first, _generate(eager, ids, mask, DynamicCache(config=eager.config)).sequences)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.bytes_in_use() == 0
    if page_size:
        assert cache.store.allocator.num_free == cache.store.k_pools[0].shape[0]
    one, one_mask = _prompts(1)
    got = _generate(ours, one, one_mask, cache).sequences
    assert torch.equal(got, _generate(eager, one, one_mask, DynamicCache(config=eager.config)).sequences)


HYBRIDS = {
    "qwen3.5 (Gated DeltaNet + attention)": ("qwen3_5_text", dict(
        head_dim=16, num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16)),
    "lfm2 (convolutions + attention)": ("lfm2", dict(num_hidden_layers=3, full_attn_idxs=[1], block_ff_dim=128)),
    "gemma3n (layers sharing KV)": ("gemma3n_text", dict(
        head_dim=16, num_hidden_layers=4, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, laurel_rank=8,
        activation_sparsity_pattern=[0.0] * 4, altup_num_inputs=2, intermediate_size=[128] * 4)),
}  # fmt: skip


@pytest.mark.parametrize("batch", [1, 3], ids=["one-prompt", "left-padded-3"])
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_models_generate_as_eager_with_flashkv_cache(name, batch):
    """Hybrid models: FlashKVCache holds the attention layers and hands the linear-attention or
    convolution layers transformers' own cache layers; a layer that shares an earlier layer's keys
    and values (Gemma 3n) reads that layer's cache in place. Greedy tokens equal eager's with
    DynamicCache, contiguous and paged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = HYBRIDS[name]
    config = lambda: AutoConfig.for_model(model_type, **{**nb10.COMMON, **extra})  # noqa: E731
    hf.register("torch")
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(config(), attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_config(config(), attn_implementation=hf.NAME).eval()
    ours.load_state_dict(eager.state_dict())
    text = ours.config
    assert set(text.layer_types) - set(hf_cache.ATTENTION_LAYER_TYPES) or text.num_kv_shared_layers
    ids, mask = _prompts(batch)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config)).sequences
    for page_size in (None, 4):
        cache = hf.FlashKVCache(ours.config, batch, 64, page_size=page_size)
        assert torch.equal(_generate(ours, ids, mask, cache).sequences, want), page_size
        assert cache.bytes_in_use() > 0
    assert torch.equal(_generate(ours, ids, mask, DynamicCache(config=ours.config)).sequences, want)


def test_the_alias_keeps_working_and_falcon_reaches_flashkv_edu(monkeypatch):
    """The earlier name still works where it did; Falcon, whose attention is inline, runs through
    this package's attention function (counted)."""
    from transformers import AutoModelForCausalLM

    _pair("llama")
    alias = AutoModelForCausalLM.from_config(nb10.tiny_config("llama"), attn_implementation=hf.ALIAS).eval()
    assert alias.config._attn_implementation == hf.ALIAS
    calls = []
    real = hf_attention.attention_options  # every call of the attention function checks its options first
    monkeypatch.setattr(hf_attention, "attention_options", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, falcon = _pair("falcon")
    falcon(input_ids=torch.tensor([[3, 4, 5]]))
    assert len(calls) == falcon.config.num_hidden_layers


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "paged"])
@pytest.mark.parametrize(("name", "checks_per_step"), [("llama", 1), ("gemma2", 2)])
def test_a_decode_step_is_checked_once_per_kind_of_layer(name, checks_per_step, page_size, monkeypatch):
    """Every layer of a decode step passes the same index tensors: llama's layers share one checked
    call per step; gemma2 alternates sliding-window and global layers, whose calls differ, so each
    kind is checked afresh every step. Tokens stay eager's."""
    eager, ours = _pair(name)
    ids, mask = _prompts(3)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config))
    calls = []
    real = hf_cache.check_kvcache_call
    monkeypatch.setattr(hf_cache, "check_kvcache_call", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    got = _generate(ours, ids, mask, hf.FlashKVCache(ours.config, 3, 64, page_size=page_size))
    assert torch.equal(got.sequences, want.sequences)
    assert ours.config.num_hidden_layers == 2
    assert len(calls) == (NEW_TOKENS - 1) * checks_per_step  # the prefill goes through flash_attn_with_kvcache


def _llama4_config():
    """A tiny Llama 4 text model: three chunked-attention layers (chunks of 8 positions, rotary) and a
    global NoPE layer with temperature tuning, a mixture-of-experts layer."""
    from transformers import AutoConfig

    extra = dict(head_dim=16, attention_chunk_size=8, num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0],
                 num_local_experts=2, interleave_moe_layer_step=2, intermediate_size_mlp=128)  # fmt: skip
    return AutoConfig.for_model("llama4_text", **{**nb10.COMMON, **extra})


@pytest.mark.parametrize("batch", [1, 3], ids=["one-prompt", "left-padded-3"])
def test_llama4_chunked_attention_equals_eager(batch):
    """Llama 4's chunked layers run as FlashAttention 3's ``attention_chunk``, token for token as
    eager over 36 positions (4 chunks of 8; rows padded by 4 and 7, so chunks start mid-window):
    over a FlashKVCache, contiguous and paged, and over transformers' DynamicCache, which hands the
    attention only the last 7 keys plus the new one (the mask function records where they start)."""
    from transformers import AutoModelForCausalLM

    hf.register("torch")
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(_llama4_config(), attn_implementation="eager").eval()
    ours = AutoModelForCausalLM.from_config(_llama4_config(), attn_implementation=hf.NAME).eval()
    ours.load_state_dict(eager.state_dict())
    assert "chunked_attention" in ours.config.layer_types
    ids, mask = _prompts(batch)
    want = _generate(eager, ids, mask, DynamicCache(config=eager.config))
    for page_size in (None, 4):
        got = _generate(ours, ids, mask, hf.FlashKVCache(ours.config, batch, 64, page_size=page_size))
        assert torch.equal(got.sequences, want.sequences), page_size
    got = _generate(ours, ids, mask, DynamicCache(config=ours.config))
    assert torch.equal(got.sequences, want.sequences)


def test_a_chunked_layer_without_the_recorded_mask_is_refused():
    """A chunked layer over dense keys whose padding mask the registered mask function did not
    build (a user's own mask, or a copy of it) cannot tell where its keys start: refused, naming
    the layer, instead of a guess."""
    from transformers import AutoModelForCausalLM

    hf.register("torch")
    ours = AutoModelForCausalLM.from_config(_llama4_config(), attn_implementation=hf.NAME).eval()
    module = ours.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 9, 16)
    with pytest.raises(ArgumentError, match="layer 0 is chunked attention.*mask function"):
        hf.attention(module, q, k, k.clone(), torch.ones(1, 9, dtype=torch.bool))
