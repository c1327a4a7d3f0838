"""Prefix reuse across requests: vLLM's block-hash chain and SGLang's radix tree (notebook 11).

Both answer one question for a new prompt: how many of its first tokens already have keys and
values in the cache?

* :class:`BlockHashIndex` is vLLM's automatic prefix caching (and :class:`~flashkv_edu.paged.
  BlockAllocator`'s): only **full** blocks are cached, each under a hash of its parent block's
  hash and its own tokens, so a hit is a run of whole blocks from the start.
* :class:`RadixTree` is SGLang's RadixAttention index: a tree over token ids whose edges hold
  runs of tokens, so a hit can end at any token.

Neither reuses a prompt's last token: its logits are needed, so it is always computed (a
fully cached prompt would leave nothing to prefill: ``seqlen_q = 0``). With room for everything,
a block hash finds ``floor(m / block_size) * block_size`` of the ``m`` tokens the radix tree
finds: the difference is the partial last block of every match.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass, field

from .paged import block_hash, token_ids
from .validation import ArgumentError, check_int

__all__ = [
    "FEW_SHOT",
    "QUESTIONS",
    "SYSTEM_PROMPT",
    "TURNS",
    "BlockHashIndex",
    "PrefixRequest",
    "RadixNode",
    "RadixTree",
    "ReuseResult",
    "compare_reuse",
    "replay",
    "reusable",
    "shared_prefix_workload",
]


def reusable(tokens: list[int]) -> int:
    """How many leading tokens of a prompt may come from a cache: all but the last."""
    return max(len(tokens) - 1, 0)


class BlockHashIndex:
    """Full blocks of ``block_size`` tokens keyed by ``block_hash(parent, tokens)``, at most
    ``capacity`` blocks (None: no limit), least recently used evicted first."""

    def __init__(self, block_size: int, capacity: int | None = None):
        self.block_size = check_int("block_size", block_size, low=1)
        self.capacity = None if capacity is None else check_int("capacity", capacity, low=1)
        self.keys: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.keys)

    def _chain(self, tokens: list[int], limit: int) -> list[bytes]:
        bs, keys, parent = self.block_size, [], None
        for i in range(limit // bs):
            parent = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            keys.append(parent)
        return keys

    def match(self, tokens) -> int:
        """Leading tokens of ``tokens`` found (whole blocks, never the last token)."""
        tokens = token_ids("tokens", tokens)
        found = 0
        for key in self._chain(tokens, reusable(tokens)):
            if key not in self.keys:
                break
            self.keys.move_to_end(key)
            found += self.block_size
        return found

    def insert(self, tokens) -> int:
        """Cache every full block of ``tokens``; returns how many blocks were new."""
        tokens = token_ids("tokens", tokens)
        new = 0
        for key in self._chain(tokens, len(tokens)):
            new += key not in self.keys
            self.keys[key] = None
            self.keys.move_to_end(key)
        while self.capacity is not None and len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
        return new


@dataclass(eq=False)
class RadixNode:
    """A node of :class:`RadixTree`: the run of tokens on the edge into it, its children by
    first token, and when it was last used."""

    tokens: tuple[int, ...] = ()
    children: dict[int, RadixNode] = field(default_factory=dict)
    parent: RadixNode | None = None
    last_use: int = 0


class RadixTree:
    """A radix tree over token ids holding at most ``capacity`` tokens (None: no limit); when
    full, the least recently used leaves are evicted first."""

    def __init__(self, capacity: int | None = None):
        self.capacity = None if capacity is None else check_int("capacity", capacity, low=1)
        self.root = RadixNode()
        self.size = 0  # tokens held
        self.clock = 0

    def _walk(self, tokens: list[int]):
        """``(node, matched)``: the deepest node whose whole path is a prefix of ``tokens``, and
        how many tokens match (possibly part of the way into one more edge)."""
        node, matched = self.root, 0
        while matched < len(tokens):
            child = node.children.get(tokens[matched])
            if child is None:
                break
            run, edge = 0, child.tokens
            while run < len(edge) and matched + run < len(tokens) and edge[run] == tokens[matched + run]:
                run += 1
            matched += run
            if run < len(child.tokens):
                return node, matched, child, run
            node = child
        return node, matched, None, 0

    def match(self, tokens) -> int:
        """Leading tokens of ``tokens`` found (any number, never the last token)."""
        tokens = token_ids("tokens", tokens)
        node, matched, child, _ = self._walk(tokens)
        self.clock += 1
        for n in ([child] if child is not None else []) + [node]:
            while n is not None:
                n.last_use = self.clock
                n = n.parent
        return min(matched, reusable(tokens))

    def insert(self, tokens) -> int:
        """Add ``tokens``; returns how many tokens were new."""
        tokens = token_ids("tokens", tokens)
        node, matched, child, run = self._walk(tokens)
        self.clock += 1
        if child is not None:  # split the edge where the match stops
            middle = RadixNode(child.tokens[:run], {child.tokens[run]: child}, node, child.last_use)
            node.children[child.tokens[0]] = middle
            child.tokens, child.parent = child.tokens[run:], middle
            node = middle
        new = len(tokens) - matched
        if new:
            leaf = RadixNode(tuple(tokens[matched:]), {}, node)
            node.children[tokens[matched]] = leaf
            node = leaf
        self.size += new
        while node is not None:
            node.last_use = self.clock
            node = node.parent
        self._evict()
        return new

    def leaves(self) -> list[RadixNode]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if not n.children and n is not self.root:
                out.append(n)
        return out

    def nodes(self) -> int:
        """Nodes in the tree, the root excluded."""
        count, stack = 0, list(self.root.children.values())
        while stack:
            n = stack.pop()
            count += 1
            stack.extend(n.children.values())
        return count

    def _evict(self) -> None:
        while self.capacity is not None and self.size > self.capacity:
            leaf = min(self.leaves(), key=lambda n: n.last_use)
            excess = self.size - self.capacity
            if excess < len(leaf.tokens):  # trim the leaf's tail
                leaf.tokens = leaf.tokens[: len(leaf.tokens) - excess]
                self.size -= excess
                continue
            del leaf.parent.children[leaf.tokens[0]]
            self.size -= len(leaf.tokens)


# --- a workload with shared prefixes ------------------------------------------------------------

SYSTEM_PROMPT = (
    '"""You are a careful Python assistant. Answer with short, correct code.\n'
    "Prefer the standard library. Explain nothing unless asked.\n"
    'Every function has a docstring and type hints."""\n'
)
FEW_SHOT = (
    "# Examples:\n"
    "def add(a: int, b: int) -> int:\n    return a + b\n\n"
    "def is_even(n: int) -> bool:\n    return n % 2 == 0\n\n"
    "def first(items: list) -> object:\n    return items[0]\n\n"
)
QUESTIONS = ["def last(items: list)", "def square(x: float)", "def is_odd(n: int)", "def total(xs: list)"]
TURNS = [
    ("# user: read a file\n", "def read(path):\n    with open(path) as f:\n        return f.read()\n"),
    ("# user: now count its lines\n", "def count(path):\n    return len(read(path).splitlines())\n"),
    ("# user: and skip blank ones\n", "def count(path):\n    return sum(1 for l in read(path).splitlines() if l)\n"),
]


@dataclass(frozen=True)
class PrefixRequest:
    """One request of :func:`shared_prefix_workload`: which part of the workload it is and its text."""

    kind: str  # "chat" or "few-shot"
    label: str
    text: str


def shared_prefix_workload(chats: int = 3, seed: int = 0) -> list[PrefixRequest]:
    """Requests that share prefixes the way real traffic does: ``chats`` multi-turn chats that
    all start with one system prompt (turn ``t`` resends the whole conversation so far), and a
    few-shot batch (the same examples, different questions), interleaved in a seeded order that
    keeps each chat's turns in sequence."""
    chats = check_int("chats", chats, low=1, high=26)
    rng = random.Random(check_int("seed", seed))
    queues = []
    for c in range(chats):
        history, turns = SYSTEM_PROMPT + f"# session {chr(97 + c)}\n", []
        for t, (user, reply) in enumerate(TURNS):
            history += user
            turns.append(PrefixRequest("chat", f"chat {chr(97 + c)}, turn {t + 1}", history))
            history += reply
        queues.append(turns)
    queues.append([PrefixRequest("few-shot", f"few-shot {i + 1}", FEW_SHOT + q) for i, q in enumerate(QUESTIONS)])
    order = []
    while any(queues):
        q = rng.choice([q for q in queues if q])
        order.append(q.pop(0))
    return order


@dataclass(frozen=True)
class ReuseResult:
    """What one index found over a workload: per request the prompt length and tokens found."""

    name: str
    prompt_tokens: list[int]
    hit_tokens: list[int]

    @property
    def hit_rate(self) -> float:
        return sum(self.hit_tokens) / sum(self.prompt_tokens)

    @property
    def saved(self) -> int:
        """Prefill tokens not computed."""
        return sum(self.hit_tokens)


def replay(index, prompts, outputs=None) -> ReuseResult:
    """Run ``prompts`` (token lists) through ``index`` (a :class:`BlockHashIndex` or
    :class:`RadixTree`) one after another: look each up, then cache it, with the tokens it
    generated (``outputs[i]`` minus the last one, which is never fed back) when given."""
    if not isinstance(index, (BlockHashIndex, RadixTree)):
        raise ArgumentError(f"index must be a BlockHashIndex or a RadixTree, got {type(index).__name__}")
    prompts = [token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    if outputs is not None and len(outputs) != len(prompts):
        raise ArgumentError(f"outputs must hold one list per prompt ({len(prompts)}), got {len(outputs)}")
    hits = []
    for i, p in enumerate(prompts):
        hits.append(index.match(p))
        index.insert(p + (list(outputs[i])[:-1] if outputs is not None else []))
    name = f"block hash, block {index.block_size}" if isinstance(index, BlockHashIndex) else "radix tree"
    return ReuseResult(name, [len(p) for p in prompts], hits)


def compare_reuse(prompts, outputs=None, block_sizes=(1, 16, 64)) -> list[ReuseResult]:
    """:func:`replay` through a radix tree and a block-hash chain per block size, room for all."""
    hashed = [replay(BlockHashIndex(bs), prompts, outputs) for bs in block_sizes]
    return [replay(RadixTree(), prompts, outputs), *hashed]
