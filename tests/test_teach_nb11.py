"""Notebook 11's exercise checks: the solution passes, the stub is not attempted yet, and
the planted mistakes (typical wrong answers a learner writes) fail."""

from __future__ import annotations

from teach_harness import exercise_tests

from flashkv_edu.teach import nb11_when_the_cache_does_not_fit as nb11


def pool_total_memory(total, weights, acts, kv, bs, u):  # forgets the utilization
    return nb11.kv_pool_blocks(total, weights, acts, kv, bs, 1.0)


def pool_no_refusal(total, weights, acts, kv, bs, u):  # a negative pool instead of an error
    return (int(total * u) - weights - acts) // (bs * kv)


def pool_no_activations(total, weights, acts, kv, bs, u):
    return nb11.kv_pool_blocks(total, weights, 0, kv, bs, u)


def pool_refuses_only_negative(total, weights, acts, kv, bs, u):  # half a block left returns 0 blocks
    usable = int(total * u) - weights - acts
    if usable < 0:
        raise ValueError("the weights do not fit")
    return usable // (bs * kv)


def radix_whole_edges(root, tokens):  # stops at the last node fully matched
    node, matched = root, 0
    while matched < len(tokens) and tokens[matched] in node.children:
        child = node.children[tokens[matched]]
        if list(tokens[matched : matched + len(child.tokens)]) != list(child.tokens):
            return matched
        matched += len(child.tokens)
        node = child
    return matched


def radix_first_token_only(root, tokens):  # trusts an edge once its first token matches
    node, matched = root, 0
    while matched < len(tokens) and tokens[matched] in node.children:
        node = node.children[tokens[matched]]
        matched += len(node.tokens)
    return min(matched, len(tokens))


def prefix_as_found(allocator, tokens, block_size):  # nano-vllm before PR #199
    blocks, parent = [], None
    for i in range(len(tokens) // block_size):
        key = nb11.block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        block = allocator.lookup(key)
        if block is None:
            break
        blocks.append(block)
        parent = key
    return blocks, len(blocks) * block_size


def prefix_trimmed_but_leaked(allocator, tokens, block_size):  # drops the last hit without releasing it
    blocks, cached = prefix_as_found(allocator, tokens, block_size)
    if blocks and cached >= len(tokens):
        blocks = blocks[:-1]
    return blocks, len(blocks) * block_size


def radix_counts_nodes(root, tokens):  # counts edges walked, not tokens matched
    node, matched, edges = root, 0, 0
    while matched < len(tokens) and tokens[matched] in node.children:
        child = node.children[tokens[matched]]
        n = 0
        while n < len(child.tokens) and matched + n < len(tokens) and tokens[matched + n] == child.tokens[n]:
            n += 1
        matched += n
        edges += 1
        if n < len(child.tokens):
            break
        node = child
    return edges


def prefix_one_block_short(allocator, tokens, block_size):  # every test prompt a multiple of the block size
    blocks, parent = [], None
    for i in range(len(tokens) // block_size - 1):
        key = nb11.block_hash(parent, tokens[i * block_size : (i + 1) * block_size])
        block = allocator.lookup(key)
        if block is None:
            break
        blocks.append(block)
        parent = key
    return blocks, len(blocks) * block_size


def take_block_as_found(allocator):  # nano-vllm #163: the old key still maps to the block
    block, _ = allocator.free_list.popitem(last=False)
    allocator.ref_count[block] = 1
    return block


def take_block_half_forgotten(allocator):  # clears the block's key but not the key's block
    block, _ = allocator.free_list.popitem(last=False)
    allocator.hash_of.pop(block, None)
    allocator.ref_count[block] = 1
    return block


def take_block_key_forgotten(allocator):  # deletes block_of[key] but leaves hash_of[block]
    block, _ = allocator.free_list.popitem(last=False)
    old = allocator.hash_of.get(block)
    if old is not None:
        del allocator.block_of[old]
    allocator.ref_count[block] = 1
    return block


def take_block_no_default(allocator):  # hash_of.pop(block) raises KeyError for a block never cached
    block, _ = allocator.free_list.popitem(last=False)
    del allocator.block_of[allocator.hash_of.pop(block)]
    allocator.ref_count[block] = 1
    return block


MISTAKES = {
    "check_kv_pool_blocks": [pool_total_memory, pool_no_refusal, pool_no_activations, pool_refuses_only_negative],
    "check_radix_match": [radix_whole_edges, radix_first_token_only, radix_counts_nodes],
    "check_cached_prefix": [prefix_as_found, prefix_trimmed_but_leaked, prefix_one_block_short],
    "check_take_free_block": [
        take_block_as_found,
        take_block_half_forgotten,
        take_block_key_forgotten,
        take_block_no_default,
    ],
}

(
    test_the_solution_passes,
    test_the_stub_is_not_attempted_yet,
    test_a_planted_mistake_fails,
    test_every_check_has_planted_mistakes,
) = exercise_tests(nb11, MISTAKES)
