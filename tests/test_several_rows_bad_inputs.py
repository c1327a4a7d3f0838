"""The error contract of notebook 14's surfaces: chunked serving, the varlen step, speculative
decoding, cascade and tree attention. Each bad input gives the right exception type (also a
RuntimeError), a message naming the argument, and leaves every object as it was."""

from __future__ import annotations

import pytest
import torch
from contract import call, case_registry, refused_unchanged

from flashkv_edu import charlm
from flashkv_edu.cascade import ancestor_mask, cascade_attention, tree_depths
from flashkv_edu.model import ModelConfig, TinyDecoder
from flashkv_edu.paged import OutOfBlocksError
from flashkv_edu.serving import Request, new_paged_cache, serve
from flashkv_edu.speculative import NgramDraft, greedy_generate, rejection_sample, speculative_generate, tree_round
from flashkv_edu.steps import varlen_step
from flashkv_edu.validation import ArgumentError, ArgumentTypeError

VALUE, TYPE = ArgumentError, ArgumentTypeError
CASES, bad = case_registry()


def _serve(**kwargs):
    model, _ = charlm.load()
    requests = [Request([1, 2, 3], 2)]
    cache = new_paged_cache(model, 8, 4, max_batch=2)
    return (lambda: serve(model, requests, cache, **kwargs)), [cache, requests]


bad("serve max_batched_tokens 0", VALUE, "max_batched_tokens")(lambda: _serve(max_batched_tokens=0))
bad("serve max_batched_tokens float", TYPE, "max_batched_tokens")(lambda: _serve(max_batched_tokens=8.0))
bad("serve chunked with overlap", VALUE, "max_batched_tokens")(lambda: _serve(max_batched_tokens=8, overlap=True))


def _varlen(tokens, slots=None):
    model, _ = charlm.load()
    cache = new_paged_cache(model, 4, 4, max_batch=2)
    cache.add_sequence()
    return (lambda: varlen_step(model, cache, slots or [0], tokens)), [cache]


bad("varlen_step an empty chunk", VALUE, "tokens")(lambda: _varlen([[]]))
bad("varlen_step token past the vocabulary", VALUE, "tokens[0]")(lambda: _varlen([[500]]))
bad("varlen_step fewer token lists than slots", VALUE, "tokens")(lambda: _varlen([[1], [2]]))
bad("varlen_step a closed slot", VALUE, "slot")(lambda: _varlen([[1]], slots=[1]))
bad("varlen_step more than the pool", OutOfBlocksError, "free blocks")(lambda: _varlen([list(range(3, 40))]))


def _spec(target=None, draft=None, prompts=None, new=4, **kwargs):
    model, _ = charlm.load()
    target = model if target is None else target
    draft = NgramDraft() if draft is None else draft
    prompts = [[1, 2, 3]] if prompts is None else prompts
    return call(speculative_generate, target, draft, prompts, new, **kwargs)


bad("speculative target not a model", TYPE, "target")(lambda: _spec(target=object()))
bad("speculative draft not a model", TYPE, "draft")(lambda: _spec(draft="ngram"))
bad("speculative draft vocabulary", VALUE, "vocabulary")(
    lambda: _spec(draft=TinyDecoder(ModelConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, n_kv_heads=1)))
)
bad("speculative no prompts", VALUE, "prompts")(lambda: _spec(prompts=[]))
bad("speculative an empty prompt", VALUE, "prompts")(lambda: _spec(prompts=[[1], []]))
bad("speculative token past the vocabulary", VALUE, "prompts[0]")(lambda: _spec(prompts=[[1, 96]]))
bad("speculative max_new_tokens 0", VALUE, "max_new_tokens")(lambda: _spec(new=0))
bad("speculative k 0", VALUE, "k")(lambda: _spec(k=0))
bad("speculative negative temperature", VALUE, "temperature")(lambda: _spec(temperature=-1.0))
bad("speculative paged not a bool", TYPE, "paged")(lambda: _spec(paged="yes"))
bad("speculative past the positions", VALUE, "positions")(lambda: _spec(new=1100))
bad("greedy_generate max_new_tokens 0", VALUE, "max_new_tokens")(
    lambda: call(greedy_generate, charlm.load()[0], [[1]], 0)
)
bad("NgramDraft max_n 0", VALUE, "max_n")(lambda: call(NgramDraft, 0))
bad("tree_round width 0", VALUE, "width")(lambda: call(tree_round, charlm.load()[0], charlm.load()[0], [1, 2], width=0))


def _reject(k_tokens=2, vocab=4, zero=False):
    q = torch.full((2, vocab), 1.0 / vocab)
    if zero:
        q[0, 1] = 0.0
    p = torch.full((3, 4), 0.25)
    return call(rejection_sample, [1] * k_tokens, q, p)


bad("rejection_sample drafts and probs disagree", VALUE, "draft_tokens")(lambda: _reject(k_tokens=3))
bad("rejection_sample vocabularies disagree", VALUE, "target_probs")(lambda: _reject(vocab=5))
bad("rejection_sample a draft the draft could not propose", VALUE, "draft_probs")(lambda: _reject(zero=True))


def _cascade(q_tokens=1, prefix_batch=1):
    q = torch.randn(2, q_tokens, 4, 16)
    pk = torch.randn(prefix_batch, 8, 2, 16)
    sk = torch.randn(2, 4, 2, 16)
    lens = torch.tensor([4, 2], dtype=torch.int32)
    return (lambda: cascade_attention(q, pk, pk.clone(), sk, sk.clone(), lens)), [pk, sk, lens]


bad("cascade two query tokens", VALUE, "seqlen_q")(lambda: _cascade(q_tokens=2))
bad("cascade a prefix per row", VALUE, "prefix_k")(lambda: _cascade(prefix_batch=2))
bad("ancestor_mask a root that has a parent", VALUE, "parents")(lambda: call(ancestor_mask, [0, 0]))
bad("tree_depths a child before its parent", VALUE, "parents")(lambda: call(tree_depths, [-1, 2, 0]))


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input(c):
    refused_unchanged(c, *c.build())


def test_the_module_has_its_cases():
    assert len(CASES) >= 25
