"""Invariants of tree construction and acceptance on random trees and random target predictions."""

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dflash_sglang.tree import build_tree, chain_tree, max_tree_nodes
from dflash_sglang.verify import greedy_verify

shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 3), st.integers(3, 12), st.integers(1, 40),
                   st.integers(0, 2**31 - 1))


def random_tree(bs, depth, topk, vocab, budget, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.randn(bs, depth, vocab, generator=g).log_softmax(-1)
    roots = torch.randint(0, vocab, (bs,), generator=g)
    return build_tree(roots, logprobs, budget, topk), logprobs, g


def node_scores(tree, logprobs, b):
    scores = [0.0]
    for i in range(1, tree.num_nodes):
        d, tok, parent = int(tree.depths[b, i]), int(tree.tokens[b, i]), int(tree.parents[b, i])
        scores.append(scores[parent] + float(logprobs[b, d - 1, tok]))
    return scores


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_tree_structure(shape):
    bs, depth, topk, vocab, budget, seed = shape
    topk = min(topk, vocab)
    tree, logprobs, _ = random_tree(bs, depth, topk, vocab, budget, seed)
    assert tree.num_nodes == 1 + min(budget, max_tree_nodes(depth, topk))
    mask = tree.ancestor_mask()
    for b in range(bs):
        scores = node_scores(tree, logprobs, b)
        assert all(a >= c - 1e-6 for a, c in zip(scores[1:], scores[2:])), "best-first: pop order is by score"
        for i in range(1, tree.num_nodes):
            parent = int(tree.parents[b, i])
            assert 0 <= parent < i and tree.depths[b, i] == tree.depths[b, parent] + 1
            ancestors, node = {i}, i
            while node > 0:
                node = int(tree.parents[b, node])
                ancestors.add(node)
            assert set(mask[b, i].nonzero().flatten().tolist()) == ancestors
        for kids in tree.children(b):
            toks = [int(tree.tokens[b, k]) for k in kids]
            assert len(set(toks)) == len(toks), "siblings carry distinct tokens"


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_tree_is_the_best_budget_of_prefixes(depth, topk, budget, seed):
    """Brute force: the tree's node scores are the `budget` best rank-prefix scores."""
    tree, logprobs, _ = random_tree(1, depth, topk, 6, budget, seed)
    top = logprobs[0].topk(topk, dim=-1).values
    all_scores = [sum(float(top[d, r]) for d, r in enumerate(ranks))
                  for n in range(1, depth + 1) for ranks in itertools.product(range(topk), repeat=n)]
    best = sorted(all_scores, reverse=True)[: tree.num_nodes - 1]
    got = sorted(node_scores(tree, logprobs, 0)[1:], reverse=True)
    assert torch.allclose(torch.tensor(got), torch.tensor(best), atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(shapes, st.floats(0.0, 1.0))
def test_greedy_accept_invariants(shape, agreement):
    bs, depth, topk, vocab, budget, seed = shape
    topk = min(topk, vocab)
    tree, _, g = random_tree(bs, depth, topk, vocab, budget, seed)
    preds = torch.randint(0, vocab, tree.tokens.shape, generator=g)
    # Make the target agree with some child often, so long paths occur.
    for b in range(bs):
        for node, kids in enumerate(tree.children(b)):
            if kids and torch.rand((), generator=g) < agreement:
                preds[b, node] = tree.tokens[b, kids[int(torch.randint(len(kids), (), generator=g))]]
    path, accept_len, bonus = greedy_verify(tree, preds)
    for b in range(bs):
        nodes = [n for n in path[b].tolist() if n >= 0]
        assert nodes[0] == 0 and len(nodes) == int(accept_len[b]) + 1, "commit length = accepted + 1"
        for parent, child in zip(nodes, nodes[1:]):
            assert int(tree.parents[b, child]) == parent, "accepted nodes form a root path"
            assert int(tree.tokens[b, child]) == int(preds[b, parent]), "each accepted token is the target's"
        last = nodes[-1]
        assert int(bonus[b]) == int(preds[b, last])
        assert all(int(tree.tokens[b, k]) != int(preds[b, last]) for k in tree.children(b)[last]), "maximal"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 15), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_chain_accept_is_the_leading_match_count(bs, depth, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    drafts = torch.randint(0, vocab, (bs, depth), generator=g)
    preds = torch.randint(0, vocab, (bs, depth + 1), generator=g)
    tree = chain_tree(torch.zeros(bs, dtype=torch.long), drafts)
    _, accept_len, bonus = greedy_verify(tree, preds)
    for b in range(bs):
        n = 0
        while n < depth and drafts[b, n] == preds[b, n]:
            n += 1
        assert int(accept_len[b]) == n and int(bonus[b]) == int(preds[b, n])


def kernel_tree(shape, max_seq_len):
    """A batch of trees as the SGLang step builds them (the kernels' op, CPU reference here) over random sorted
    top-k log-probs, at random committed lengths; returns (tree, seq_lens, generator)."""
    from dflash_sglang.kernels import build_draft_tree

    bs, depth, topk, vocab, budget, seed = shape
    topk = min(topk, vocab)
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.rand((bs, depth, topk), generator=g).sort(dim=-1, descending=True).values.log()
    ids = torch.randint(0, vocab, (bs, depth, topk), generator=g)
    seq_lens = torch.randint(0, max_seq_len, (bs,), generator=g)
    return build_draft_tree(torch.randint(0, vocab, (bs,), generator=g), logprobs, ids, seq_lens, budget), seq_lens, g


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(1, 4))
def test_tree_commit_is_a_permutation_with_the_accepted_path_first(shape, rows):
    """The SGLang tree step's commit (kernels' verify result -> req_to_token reorder): every request's reserved
    columns keep the same slots, the accepted path's come first in path order, nothing else in the table moves."""
    from dflash_sglang.kernels import commit_tree, verify_tree_greedy

    bs, depth, _, vocab, _, _ = shape
    tree, seq_lens, g = kernel_tree(shape, max_seq_len=30)
    width = tree.tokens.shape[1]
    result = verify_tree_greedy(tree.tokens, tree.first_child, tree.next_sibling,
                                torch.randint(0, vocab, tree.tokens.shape, generator=g), depth)
    pools = torch.randperm(bs + rows, generator=g)[:bs]
    table = torch.randperm((bs + rows) * (30 + width), generator=g).view(bs + rows, -1).int()
    before = table.clone()
    commit_tree(table, pools, seq_lens, result.path, result.accept_len, result.emitted, width)
    touched = torch.zeros_like(table, dtype=torch.bool)
    for b in range(bs):
        start, pool, n = int(seq_lens[b]), int(pools[b]), int(result.accept_len[b]) + 1
        region_before = before[pool, start: start + width]
        region_after = table[pool, start: start + width]
        assert sorted(region_after.tolist()) == sorted(region_before.tolist())
        assert region_after[:n].tolist() == region_before[result.path[b, :n].long()].tolist()
        touched[pool, start: start + width] = True
    assert torch.equal(table[~touched], before[~touched])


@settings(max_examples=60, deadline=None)
@given(shapes)
def test_tree_verify_mask_rows_see_the_context_and_their_ancestors_only(shape):
    """Decoding the flat mask back, request by request: row i sees every committed token and exactly the
    ancestors of node i (itself included)."""
    from dflash_sglang.kernels import tree_verify_inputs

    bs = shape[0]
    tree, seq_lens, _ = kernel_tree(shape, max_seq_len=20)
    width = tree.tokens.shape[1]
    table = torch.arange(bs * (20 + width), dtype=torch.int32).view(bs, -1)
    mask = tree_verify_inputs(tree.ancestor_mask, seq_lens, torch.arange(bs), table,
                              int(width * (seq_lens + width).sum())).mask
    offset = 0
    for b in range(bs):
        rows = mask[offset: offset + width * (int(seq_lens[b]) + width)].view(width, -1)
        assert rows[:, : int(seq_lens[b])].all()
        for i in range(width):
            ancestors, node = {i}, i
            while node > 0:
                node = int(tree.parents[b, node])
                ancestors.add(node)
            assert set(rows[i, int(seq_lens[b]):].nonzero().flatten().tolist()) == ancestors
        offset += rows.numel()
