"""Speculative decoding with rollback (notebook 14).

A cheap **draft** proposes ``k`` tokens; the **target** checks all of them in one call over
``k + 1`` query rows (the last accepted token and the ``k`` drafts, at positions ``L .. L + k``,
bottom-right causal over the cache); the longest agreeing run is kept, plus one token from the
target (the correction, or a bonus when every draft was accepted). Leviathan et al.
(arXiv 2211.17192) and Chen et al. (arXiv 2302.01318): with greedy decoding the output is the
target's own; with sampling, :func:`rejection_sample` keeps the target's distribution.

Rollback is cheap: the verification wrote ``k + 1`` keys per layer, of which ``a + 1`` stay;
a contiguous cache lowers ``cache_seqlens`` (the rejected keys are overwritten next round), a
paged cache also returns its lookahead blocks (``PagedKVCache.truncate``). Drafts: a smaller
trained model (:data:`~flashkv_edu.charlm.DRAFT_CHECKPOINT`), or :class:`NgramDraft`, prompt
lookup (the tokens that followed the last occurrence of the latest n-gram), which costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .api import flash_attn_with_kvcache
from .model import TinyDecoder
from .steps import new_paged_cache, plan_step, run_step
from .validation import ArgumentError, ArgumentTypeError, check_bool, check_int, check_positive, check_tensor

__all__ = [
    "ModelCache",
    "NgramDraft",
    "SpeculativeResult",
    "accept_greedy",
    "expected_tokens_per_call",
    "greedy_generate",
    "rejection_sample",
    "speculative_generate",
    "tree_round",
]


@dataclass
class SpeculativeResult:
    """What :func:`speculative_generate` did: ``tokens`` (the new tokens per prompt), drafts
    ``proposed`` and ``accepted`` (all prompts), ``target_calls`` and ``draft_calls`` (batched
    calls: one call serves every prompt), ``accepted_per_round`` (per prompt and round), and with
    paged caches ``blocks_held`` and ``blocks_needed`` at the end (target and draft together): the
    blocks the caches hold and what their lengths need (equal: no lookahead block leaked)."""

    tokens: list[list[int]]
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    accepted_per_round: list[int] = field(default_factory=list)
    blocks_held: int = 0
    blocks_needed: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def expected_tokens_per_call(alpha: float, k: int) -> float:
    """Tokens one target call yields when each draft is accepted with probability ``alpha``
    independently: ``(1 - alpha^(k+1)) / (1 - alpha)`` (Leviathan et al.)."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def accept_greedy(draft_tokens: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """Greedy verification: ``target_logits`` ``(k + 1, vocab)`` of the rows ``[last, d_1 .. d_k]``.
    Returns ``(a, next)``: how many drafts agree with the target's argmax, in a row from the first,
    and the target's own token after them."""
    choice = target_logits.argmax(-1).tolist()
    a = 0
    while a < len(draft_tokens) and draft_tokens[a] == choice[a]:
        a += 1
    return a, choice[a]


def rejection_sample(draft_tokens, draft_probs, target_probs, *, generator=None) -> list[int]:
    """Speculative sampling: ``draft_tokens`` ``(k,)`` drawn from ``draft_probs`` ``(k, V)``;
    ``target_probs`` ``(k + 1, V)`` the target's distributions at the same rows plus one. Draft
    ``i`` is accepted with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection a
    token is drawn from ``max(0, p_i - q_i)`` (normalised) and the round ends; when every draft is
    accepted a bonus token is drawn from ``p_k``. The emitted tokens follow the target's
    distribution exactly. Returns the emitted tokens (accepted drafts, then one more)."""
    check_tensor("draft_probs", draft_probs, ndim=2)
    check_tensor("target_probs", target_probs, ndim=2)
    d = torch.as_tensor(draft_tokens).reshape(-1).tolist()
    k, vocab = draft_probs.shape
    if len(d) != k or tuple(target_probs.shape) != (k + 1, vocab):
        raise ArgumentError(
            f"draft_tokens ({len(d)},), draft_probs (k, V) and target_probs (k + 1, V) must agree, got "
            f"{tuple(draft_probs.shape)} and {tuple(target_probs.shape)}"
        )
    out = []
    for i, tok in enumerate(d):
        p, q = float(target_probs[i, tok]), float(draft_probs[i, tok])
        if q <= 0:
            raise ArgumentError(f"draft_probs[{i}, {tok}] is 0: the draft could not have proposed token {tok}")
        if float(torch.rand((), generator=generator)) < min(1.0, p / q):
            out.append(tok)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        residual = residual if float(residual.sum()) > 0 else target_probs[i]
        out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out


class NgramDraft:
    """Prompt lookup: propose the ``k`` tokens that followed the most recent earlier occurrence of
    the context's last ``n`` tokens (``n`` from ``max_n`` down to 1), padded with the last token."""

    def __init__(self, max_n: int = 3):
        self.max_n = check_int("max_n", max_n, low=1)

    def propose(self, context: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(context) - 1), 0, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == tail:
                    follow = context[start + n : start + n + k]
                    return follow + [follow[-1]] * (k - len(follow))
        return [context[-1]] * k


class ModelCache:
    """A model's KV cache for ``batch`` rows, contiguous (``flash_attn_with_kvcache`` with
    ``cache_batch_idx``) or paged (``serving``'s step), fed any number of tokens per row."""

    def __init__(self, model: TinyDecoder, batch: int, capacity: int, paged: bool):
        self.model, self.paged = model, paged
        if paged:
            self.cache = new_paged_cache(model, batch * (-(-capacity // 16) + 1), 16, max_batch=batch)
            self.rows = [self.cache.add_sequence()[0] for _ in range(batch)]
        else:
            self.cache = model.new_cache(batch, capacity)
        self.lengths = [0] * batch

    def feed(self, rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
        """Run ``tokens[i]`` (equal lengths) after row ``rows[i]``'s cache: logits ``(len(rows), n, V)``."""
        n = len(tokens[0])
        if self.paged:
            step = plan_step(self.model, self.cache, [self.rows[r] for r in rows], tokens)
            logits = run_step(step, every_position=True)
        else:
            starts = torch.tensor([self.lengths[r] for r in rows], dtype=torch.int32)
            ctx = _KVContext(self.cache, torch.tensor(rows, dtype=torch.int32), starts, self.model.rope())
            positions = starts.long()[:, None] + torch.arange(n)[None, :]
            logits = self.model.run(torch.tensor(tokens), positions, ctx)
            for layer in self.cache:
                layer.cache_seqlens[torch.tensor(rows)] = starts + n
        for r in rows:
            self.lengths[r] += n
        return logits

    def truncate(self, row: int, length: int) -> None:
        """Keep the first ``length`` tokens of ``row`` (the rest are rejected drafts)."""
        if self.paged:
            self.cache.truncate(self.rows[row], length)
        else:
            for layer in self.cache:
                layer.cache_seqlens[row] = length
        self.lengths[row] = length

    def blocks_in_use(self) -> int:
        return self.cache.allocator.num_blocks - self.cache.allocator.num_free if self.paged else 0

    def blocks_needed(self) -> int:
        """Blocks the rows' lengths need (paged; 0 for contiguous caches)."""
        return sum(-(-n // self.cache.block_size) for n in self.lengths) if self.paged else 0


class _KVContext:
    """Attention for ``TinyDecoder.run`` over per-layer contiguous caches, rows ``rows``."""

    def __init__(self, caches, rows, starts, rope):
        self.caches, self.rows, self.starts, self.rope = caches, rows, starts, rope

    def attend(self, layer, q, k, v):
        c = self.caches[layer]
        cos, sin = self.rope
        return flash_attn_with_kvcache(
            q, c.k_cache, c.v_cache, k, v, rotary_cos=cos.to(q.dtype), rotary_sin=sin.to(q.dtype),
            cache_seqlens=self.starts, cache_batch_idx=self.rows, causal=True, rotary_interleaved=False,
        )  # fmt: skip


def _feed_grouped(cache: ModelCache, pending: dict[int, list[int]]) -> tuple[dict[int, torch.Tensor], int]:
    """Feed each row its own tokens (rows with as many tokens share a call): the logits per row
    ``(n_row, V)`` and the number of calls."""
    out, calls = {}, 0
    for n in sorted({len(t) for t in pending.values()}):
        rows = [r for r, t in pending.items() if len(t) == n]
        logits = cache.feed(rows, [pending[r] for r in rows])
        calls += 1
        for r, row in zip(rows, logits, strict=True):
            out[r] = row
    return out, calls


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, -1)


@torch.no_grad()
def speculative_generate(target, draft, prompts, max_new_tokens: int, *, k: int = 4, temperature: float = 0.0,
                         generator=None, paged: bool = False) -> SpeculativeResult:  # fmt: skip
    """Generate ``max_new_tokens`` for each prompt (lists of token ids) with ``target``, ``k``
    drafts per round from ``draft`` (a :class:`~flashkv_edu.model.TinyDecoder` with the same
    vocabulary, or a :class:`NgramDraft`). ``temperature`` 0: greedy, token-identical to the target
    decoding alone; above 0: speculative sampling (``generator`` seeds it). ``paged``: paged caches
    (rejected drafts' blocks returned), else contiguous ones (lengths lowered)."""
    if not isinstance(target, TinyDecoder):
        raise ArgumentTypeError(f"target must be a TinyDecoder, got {type(target).__name__}")
    if not isinstance(draft, (TinyDecoder, NgramDraft)):
        raise ArgumentTypeError(f"draft must be a TinyDecoder or an NgramDraft, got {type(draft).__name__}")
    if isinstance(draft, TinyDecoder) and draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ArgumentError(
            f"draft's vocabulary ({draft.cfg.vocab_size}) differs from target's ({target.cfg.vocab_size})"
        )
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ArgumentError(f"prompts must be a non-empty list of token-id lists, got {prompts!r}")
    prompts = [[check_int(f"prompts[{i}][j]", t, low=0, high=target.cfg.vocab_size - 1) for t in p]
               for i, p in enumerate(prompts)]  # fmt: skip
    if any(not p for p in prompts):
        raise ArgumentError("prompts must not hold an empty prompt")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    k = check_int("k", k, low=1, high=32)
    temperature = check_positive("temperature", temperature, allow_zero=True)
    paged = check_bool("paged", paged)
    capacity = max(len(p) for p in prompts) + max_new_tokens + k + 1
    if capacity > target.cfg.max_seqlen:
        raise ArgumentError(
            f"prompt + max_new_tokens + k + 1 = {capacity} exceeds the target's {target.cfg.max_seqlen} positions"
        )
    b = len(prompts)
    result = SpeculativeResult([[] for _ in prompts])
    t_cache = ModelCache(target, b, capacity, paged)
    d_cache = ModelCache(draft, b, capacity, paged) if isinstance(draft, TinyDecoder) else None
    context = [list(p) for p in prompts]
    warm = {r: context[r][:-1] for r in range(b) if len(context[r]) > 1}  # every model caches all but the last token
    result.target_calls += _feed_grouped(t_cache, warm)[1] if warm else 0
    if d_cache is not None and warm:
        result.draft_calls += _feed_grouped(d_cache, warm)[1]
    active = list(range(b))
    while active:
        drafts, q_probs = _propose(
            draft, d_cache, context, active, k, temperature, generator, result, target.cfg.vocab_size
        )
        verify = {r: [context[r][-1], *drafts[r]] for r in active}
        start = {r: t_cache.lengths[r] for r in active}
        logits, calls = _feed_grouped(t_cache, verify)
        result.target_calls += calls
        for r in list(active):
            if temperature == 0:
                a, nxt = accept_greedy(drafts[r], logits[r])
                emitted = drafts[r][:a] + [nxt]
            else:
                emitted = rejection_sample(drafts[r], q_probs[r], _probs(logits[r], temperature), generator=generator)
                a = len(emitted) - 1
            result.proposed += k
            result.accepted += a
            result.accepted_per_round.append(a)
            room = max_new_tokens - len(result.tokens[r])
            emitted = emitted[:room]
            before = len(context[r])
            context[r] += emitted
            result.tokens[r] += emitted
            t_cache.truncate(r, start[r] + min(a, len(emitted) - 1) + 1)  # last + the accepted drafts kept
            if d_cache is not None:
                d_cache.truncate(r, min(d_cache.lengths[r], before + min(a, len(emitted) - 1)))
            if len(result.tokens[r]) >= max_new_tokens:
                active.remove(r)
    for cache in (c for c in (t_cache, d_cache) if c is not None):
        result.blocks_held += cache.blocks_in_use()
        result.blocks_needed += cache.blocks_needed()
    return result


def _propose(draft, d_cache, context, active, k, temperature, generator, result, vocab):
    """``k`` drafts per active row (and, sampling, the draft's distributions ``(k, V)``)."""
    drafts, q_probs = {r: [] for r in active}, {r: [] for r in active}
    if isinstance(draft, NgramDraft):
        for r in active:
            drafts[r] = draft.propose(context[r], k)
            q_probs[r] = torch.nn.functional.one_hot(torch.tensor(drafts[r]), vocab).float()
        return drafts, q_probs
    pending = {r: context[r][d_cache.lengths[r] :] for r in active}  # the last token, or two after a full accept
    for step in range(k):
        logits, calls = _feed_grouped(d_cache, pending)
        result.draft_calls += calls
        for r in active:
            last = logits[r][-1]
            if temperature == 0:
                tok = int(last.argmax())
            else:
                probs = _probs(last, temperature)
                tok = int(torch.multinomial(probs, 1, generator=generator))
                q_probs[r].append(probs)
            drafts[r].append(tok)
        if step < k - 1:
            pending = {r: [drafts[r][-1]] for r in active}
    if temperature > 0:
        q_probs = {r: torch.stack(q_probs[r]) for r in active}
    return drafts, q_probs


@torch.no_grad()
def greedy_generate(
    model: TinyDecoder, prompts, max_new_tokens: int, *, paged: bool = False
) -> tuple[list[list[int]], int]:
    """Target-only greedy decoding through the same caches as :func:`speculative_generate` (the
    baseline it is measured against): the new tokens per prompt and the number of model calls."""
    if not isinstance(model, TinyDecoder):
        raise ArgumentTypeError(f"model must be a TinyDecoder, got {type(model).__name__}")
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    prompts = [list(p) for p in prompts]
    cache = ModelCache(
        model, len(prompts), max(len(p) for p in prompts) + max_new_tokens + 1, check_bool("paged", paged)
    )
    logits, calls = _feed_grouped(cache, {r: p for r, p in enumerate(prompts)})
    out = [[int(logits[r][-1].argmax())] for r in range(len(prompts))]
    for _ in range(max_new_tokens - 1):
        step = cache.feed(list(range(len(prompts))), [[o[-1]] for o in out])
        calls += 1
        for r, row in enumerate(step):
            out[r].append(int(row[-1].argmax()))
    return out, calls


@torch.no_grad()
def tree_round(target: TinyDecoder, draft: TinyDecoder, prompt: list[int], *, width: int = 2, depth: int = 3):
    """One round of tree speculation for one prompt: the draft's ``width`` best first tokens, each
    continued greedily to ``depth`` tokens, verified by the target in one call over the tree
    (:class:`~flashkv_edu.cascade.TreeContext`), the accepted path compacted into the target's
    cache. Returns ``dict(tokens, parents, path, next, logits, cache)``: the tree's tokens (root:
    the prompt's last token), its parents, the accepted path (node indices), the target's next
    token and the verification logits ``(nodes, vocab)``."""
    from .cascade import TreeContext, accept_tree

    width = check_int("width", width, low=1, high=8)
    depth = check_int("depth", depth, low=1, high=16)
    tokens, parents = [prompt[-1]], [-1]
    d_first = ModelCache(draft, 1, len(prompt) + depth + 1, False)
    first = d_first.feed([0], [prompt])[0][-1]
    for branch in torch.topk(first, width).indices.tolist():
        d_cache = ModelCache(draft, 1, len(prompt) + depth + 1, False)
        d_cache.feed([0], [prompt])
        tok, parent = branch, 0
        for level in range(depth):
            tokens.append(tok)
            parents.append(parent)
            parent = len(tokens) - 1
            if level < depth - 1:
                tok = int(d_cache.feed([0], [[tok]])[0][-1].argmax())
    t_cache = ModelCache(target, 1, len(prompt) + depth + 1, False)
    if len(prompt) > 1:
        t_cache.feed([0], [prompt[:-1]])
    ctx = TreeContext(t_cache.cache, 0, len(prompt) - 1, parents, target.rope())
    logits = target.run(torch.tensor([tokens]), ctx.positions, ctx)[0]
    path, nxt = accept_tree(tokens, parents, logits)
    ctx.compact(path)
    return dict(tokens=tokens, parents=parents, path=path, next=nxt, logits=logits, cache=t_cache.cache)
