"""Tree and chain-step kernels (csrc/) and their references (dflash_sglang/kernels/reference.py).

CPU (CI): the references against `tree.build_tree` and `verify.greedy_verify` (identical results on random
trees, ties and -inf log-probs included), the explicit-randomness sampling reference and
`verify.sampling_verify_tree` against the exact law of the emitted tokens (chi-square), the tree verify's slots
and mask and the commit against plain loops, the chain-step references against the torch step they
replace, and a build of csrc/ with nvcc for sm_90a.

GPU (`pytest -m gpu`, on the box through scripts/device/kernel_tests.sh): each kernel against its reference on
fresh random inputs, exactly, with outputs pre-filled with garbage so an unwritten entry shows; the sampling
kernel also against the exact law; and every op captured in a CUDA graph (a host sync would break capture).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dflash_sglang.kernels import (
    build_draft_tree,
    chain_accept_greedy,
    chain_block,
    commit_tree,
    draw_verify_randoms,
    jit,
    reference,
    tree_links,
    tree_verify_inputs,
    verify_tree_greedy,
    verify_tree_sampling,
)
from dflash_sglang.kernels.buffers import (empty_chain_block, empty_chain_step, empty_tree, empty_tree_commit,
                                          empty_verify, empty_verify_inputs)
from dflash_sglang.tree import DraftTree, build_tree, chain_tree
from dflash_sglang.verify import greedy_verify, sampling_verify_tree

ALPHA = 1e-3
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------- inputs


def draft_logprobs(bs: int, depth: int, vocab: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """[bs, depth, vocab] draft scores: `continuous`, `ties` (half-integer values, so equal sums abound), or
    `filtered` (log of a top-2 distribution: -inf beyond rank 2, hence NaN heap scores in the reference)."""
    if kind == "continuous":
        return torch.randn(bs, depth, vocab, generator=g).log_softmax(-1)
    if kind == "ties":
        return torch.randint(-6, 1, (bs, depth, vocab), generator=g).float() * 0.5
    logits = torch.randn(bs, depth, vocab, generator=g)
    kth = logits.topk(2, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(-1).log()


def random_tree(bs: int, n: int, max_depth: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Arbitrary parent-before-child trees (not DDTree-shaped; repeated sibling tokens when vocab is small):
    tokens [bs, n] int64, parents [bs, n] int32, first_child, next_sibling."""
    parents = torch.full((bs, n), -1, dtype=torch.int32)
    depth = torch.zeros((bs, n), dtype=torch.long)
    for i in range(1, n):
        allowed = (depth[:, :i] < max_depth).float()
        parent = torch.multinomial(allowed, 1, generator=g).squeeze(1)
        parents[:, i] = parent.int()
        depth[:, i] = depth.gather(1, parent[:, None]).squeeze(1) + 1
    tokens = torch.randint(0, vocab, (bs, n), generator=g)
    return (tokens, parents, *tree_links(parents))


def follow_predictions(tokens: torch.Tensor, parents: torch.Tensor, vocab: int, hit: float,
                       g: torch.Generator) -> torch.Tensor:
    """Target argmax per node: with probability `hit` the token of one of its children, else a random token."""
    bs, n = tokens.shape
    predict = torch.randint(0, vocab, (bs, n), generator=g)
    for b in range(bs):
        kids: list[list[int]] = [[] for _ in range(n)]
        for c, p in enumerate(parents[b].tolist()):
            if p >= 0:
                kids[p].append(c)
        for node, children in enumerate(kids):
            if children and torch.rand((), generator=g) < hit:
                predict[b, node] = tokens[b, children[int(torch.randint(len(children), (), generator=g))]]
    return predict


def node_depths(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    return (reference.ancestor_mask(parents, max_depth).sum(-1) - 1).long()


def pad_path(path: torch.Tensor, width: int) -> torch.Tensor:
    out = torch.full((path.shape[0], width), -1, dtype=torch.long)
    out[:, : path.shape[1]] = path
    return out


# ---------------------------------------------------------------------------------------------------- CPU: references


@pytest.mark.parametrize("kind", ["continuous", "ties", "filtered"])
def test_build_reference_matches_tree_build(kind):
    g = torch.Generator().manual_seed(1)
    for bs, depth, topk, vocab, budget in itertools.product((1, 3), (1, 3, 6), (1, 2, 4), (8, 40), (0, 1, 5, 30)):
        logprobs = draft_logprobs(bs, depth, vocab, kind, g)
        roots = torch.randint(0, vocab, (bs,), generator=g)
        start = torch.randint(0, 1000, (bs,), generator=g)
        expected = build_tree(roots, logprobs, budget, topk)
        values, ids = logprobs.float().topk(topk, dim=-1)
        got = reference.build_draft_tree(roots, values, ids, start, budget)
        assert torch.equal(got.tokens, expected.tokens)
        assert torch.equal(got.parents.long(), expected.parents)
        assert torch.equal(got.depths.long(), expected.depths)
        assert torch.equal(got.positions, start[:, None] + expected.depths)
        assert torch.equal(got.ancestor_mask, expected.ancestor_mask())
        for b in range(bs):
            for node, children in enumerate(expected.children(b)):
                links, c = [], int(got.first_child[b, node])
                while c >= 0:
                    links.append(c)
                    c = int(got.next_sibling[b, c])
                assert links == children


def test_tree_links_of_a_chain():
    tree = chain_tree(torch.tensor([5, 6]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    first_child, next_sibling = tree_links(tree.parents)
    assert first_child.tolist() == [[1, 2, 3, -1]] * 2
    assert next_sibling.tolist() == [[-1] * 4] * 2


@pytest.mark.parametrize("shape", ["ddtree", "chain", "random"])
def test_greedy_reference_matches_verify(shape):
    g = torch.Generator().manual_seed(2)
    vocab = 12
    for trial in range(30):
        bs = 1 + trial % 4
        if shape == "ddtree":
            depth, topk = 1 + trial % 5, 1 + trial % 3
            tree = build_tree(torch.randint(0, vocab, (bs,), generator=g), draft_logprobs(bs, depth, vocab, "ties", g),
                              1 + 3 * trial, topk)
        elif shape == "chain":
            depth = 1 + trial % 7
            tree = chain_tree(torch.randint(0, vocab, (bs,), generator=g),
                              torch.randint(0, vocab, (bs, depth), generator=g))
        else:
            depth = 1 + trial % 6
            tokens, parents, _, _ = random_tree(bs, 2 + trial, depth, 4, g)
            tree = DraftTree(tokens, parents.long(), node_depths(parents, depth))
        predict = follow_predictions(tree.tokens, tree.parents, vocab, 0.8, g)
        first_child, next_sibling = tree_links(tree.parents)
        got = reference.verify_tree_greedy(tree.tokens, first_child, next_sibling, predict, depth)
        path, accept, bonus = greedy_verify(tree, predict)
        assert torch.equal(got.path.long(), pad_path(path, depth + 1))
        assert torch.equal(got.accept_len.long(), accept)
        assert torch.equal(got.bonus, bonus)
        drafts = [tree.tokens[b, path[b, 1 : accept[b] + 1]].tolist() for b in range(bs)]
        expected_emitted = [d + [int(bonus[b])] + [-1] * (depth - len(d)) for b, d in enumerate(drafts)]
        assert got.emitted.tolist() == expected_emitted


def test_sampling_reference_is_greedy_on_one_hot_targets():
    g = torch.Generator().manual_seed(3)
    vocab = 6
    tokens, parents, first_child, next_sibling = random_tree(8, 20, 5, vocab, g)
    predict = follow_predictions(tokens, parents, vocab, 0.8, g)
    probs = torch.nn.functional.one_hot(predict, vocab).float()
    coins, race = draw_verify_randoms(8, 20, vocab, "cpu", g)
    sampled = reference.verify_tree_sampling(tokens, first_child, next_sibling, probs, coins, race, 5)
    greedy = reference.verify_tree_greedy(tokens, first_child, next_sibling, predict, 5)
    for a, b in zip(sampled, greedy, strict=True):
        assert torch.equal(a, b)


# A small fixed tree for the law tests: a repeated sibling token (nodes 1 and 3), a zero-probability child (7),
# leaves at several depths, zeros in the rows.
LAW_VOCAB = 5
LAW_PARENTS = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 6]
LAW_TOKENS = [0, 1, 3, 1, 2, 0, 4, 3, 1, 2]
LAW_DEPTH = 3


def law_inputs(seed: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(LAW_PARENTS), LAW_VOCAB, generator=g) * 1.5
    logits[4, 3] = float("-inf")  # child 7 of node 4 has probability zero
    logits[8, :] = torch.tensor([0.0, float("-inf"), 1.0, float("-inf"), -1.0])
    probs = logits.softmax(-1)
    return torch.tensor(LAW_TOKENS), torch.tensor(LAW_PARENTS, dtype=torch.int32), probs


def exact_law(tokens: torch.Tensor, parents: torch.Tensor, probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """P(emitted sequence): the target walks the tree while its token is a child's (the first child with that
    token), and the sequence ends with the first token that is not."""
    law: dict[tuple[int, ...], float] = {}
    kids = [[c for c in range(len(parents)) if parents[c] == node] for node in range(len(parents))]

    def visit(node: int, prefix: tuple[int, ...], mass: float) -> None:
        by_token: dict[int, int] = {}
        for c in kids[node]:
            by_token.setdefault(int(tokens[c]), c)
        for v in range(LAW_VOCAB):
            p = mass * float(probs[node, v])
            if p == 0:
                continue
            if v in by_token:
                visit(by_token[v], prefix + (v,), p)
            else:
                law[prefix + (v,)] = law.get(prefix + (v,), 0.0) + p

    visit(0, (), 1.0)
    return law


def emitted_counts(emitted: torch.Tensor, cells: list[tuple[int, ...]]) -> torch.Tensor:
    index = {cell: i for i, cell in enumerate(cells)}
    counts = torch.zeros(len(cells), dtype=torch.float64)
    for row in emitted.tolist():
        counts[index[tuple(t for t in row if t >= 0)]] += 1
    return counts


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    import scipy.stats

    expected = expected_probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    expected = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if float(expected[-1]) == 0:
        observed, expected = observed[:-1], expected[:-1]
    return float(scipy.stats.chisquare(observed.numpy(), expected.numpy() * (observed.sum() / expected.sum()).item())
                 .pvalue)


def test_sampling_reference_law_matches_verify_and_target():
    import scipy.stats

    tokens, parents, probs = law_inputs()
    law = exact_law(tokens, parents, probs)
    cells = sorted(law)
    expected = torch.tensor([law[c] for c in cells], dtype=torch.float64)
    first_child, next_sibling = tree_links(parents[None])

    rows = 40_000
    g = torch.Generator().manual_seed(5)
    coins, race = draw_verify_randoms(rows, len(LAW_TOKENS), LAW_VOCAB, "cpu", g)
    ours = reference.verify_tree_sampling(tokens.expand(rows, -1), first_child.expand(rows, -1),
                                          next_sibling.expand(rows, -1), probs.expand(rows, -1, -1), coins, race,
                                          LAW_DEPTH)
    ours_counts = emitted_counts(ours.emitted, cells)
    assert chi_square_pvalue(ours_counts, expected) > ALPHA

    rows_verify = 4_000
    tree = DraftTree(tokens.expand(rows_verify, -1), parents.long().expand(rows_verify, -1),
                     node_depths(parents[None], LAW_DEPTH).expand(rows_verify, -1))
    path, accept, bonus = sampling_verify_tree(tree, probs.expand(rows_verify, -1, -1), g)
    theirs = [tokens[path[b, 1 : accept[b] + 1]].tolist() + [int(bonus[b])] for b in range(rows_verify)]
    theirs_counts = emitted_counts(torch.tensor([t + [-1] * (LAW_DEPTH + 1 - len(t)) for t in theirs]), cells)
    assert chi_square_pvalue(theirs_counts, expected) > ALPHA
    table = torch.stack([ours_counts, theirs_counts])
    table = table[:, table.sum(0) >= 10]
    assert scipy.stats.chi2_contingency(table.numpy()).pvalue > ALPHA

    # Power check: coins scaled by 0.9 accept too often, and the same test sees it.
    biased = reference.verify_tree_sampling(tokens.expand(rows, -1), first_child.expand(rows, -1),
                                            next_sibling.expand(rows, -1), probs.expand(rows, -1, -1), coins * 0.9,
                                            race, LAW_DEPTH)
    assert chi_square_pvalue(emitted_counts(biased.emitted, cells), expected) < ALPHA


def commit_inputs(bs: int, n: int, max_depth: int, g: torch.Generator, device="cpu"):
    """A slot table of unique slots, distinct request rows, ragged lengths and valid accepted paths."""
    pool_rows, max_len = bs + 7, 3 * n + 40
    req_to_token = torch.randperm(pool_rows * max_len, generator=g).int().reshape(pool_rows, max_len)
    req_pool_indices = torch.randperm(pool_rows, generator=g)[:bs]
    seq_lens = torch.randint(0, max_len - n + 1, (bs,), generator=g)
    tokens, parents, first_child, next_sibling = random_tree(bs, n, max_depth, 3, g)
    predict = follow_predictions(tokens, parents, 3, 0.9, g)
    verified = reference.verify_tree_greedy(tokens, first_child, next_sibling, predict, max_depth)
    return [t.to(device) for t in (req_to_token, req_pool_indices, seq_lens, verified.path, verified.accept_len,
                                   verified.emitted)]


def test_commit_reference_matches_loop():
    """The reserved columns are permuted (path first, then the other nodes in node order), nothing else in the
    table moves, and the step's outputs follow from the verifier's."""
    g = torch.Generator().manual_seed(6)
    for bs, n, depth in [(1, 1, 1), (1, 2, 1), (4, 9, 3), (6, 20, 8), (3, 30, 4), (2, 5, 15)]:
        req_to_token, rpi, seq_lens, path, accept, emitted = commit_inputs(bs, n, depth, g)
        expected_table = req_to_token.clone()
        got = reference.commit_tree(req_to_token, rpi, seq_lens, path, accept, emitted, n)
        for b in range(bs):
            r, s, a = int(rpi[b]), int(seq_lens[b]), int(accept[b])
            slots = expected_table[r, s : s + n].tolist()
            nodes = path[b, : a + 1].tolist()
            expected_table[r, s : s + n] = torch.tensor([slots[j] for j in nodes] +
                                                        [slots[j] for j in range(n) if j not in nodes])
            assert int(got.commit_lens[b]) == a + 1 and int(got.new_seq_lens[b]) == s + a + 1
            assert got.emitted[b].tolist() == [max(int(t), 0) for t in emitted[b]]
        assert torch.equal(req_to_token, expected_table)
        assert got.commit_lens.dtype == torch.int32


@pytest.mark.parametrize("seed", range(4))
def test_verify_inputs_reference_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    bs, width, tail = 3, 5, 7
    ancestor = torch.rand((bs, width, width), generator=g) < 0.5
    seq_lens = torch.randint(0, 9, (bs,), generator=g)
    table = torch.randperm(5 * 20, generator=g).int().view(5, 20)
    rows = torch.tensor([4, 0, 2])
    total = int(width * (seq_lens + width).sum()) + tail
    got = reference.tree_verify_inputs(ancestor, seq_lens, rows, table, total)
    expected = []
    for b in range(bs):
        for i in range(width):
            expected += [True] * int(seq_lens[b]) + ancestor[b, i].tolist()
        assert got.slots[b].tolist() == table[rows[b], int(seq_lens[b]) : int(seq_lens[b]) + width].tolist()
    assert got.mask.tolist() == expected + [True] * tail
    assert got.slots.dtype == torch.long


def chain_inputs(bs: int, block: int, g: torch.Generator, device="cpu"):
    """A slot table, request rows, lengths leaving room for a block, anchors, and candidates that agree with the
    target's argmax for a random number of leading drafts (0 .. B-1, all of them included)."""
    pool_rows, max_len = bs + 5, block + 60
    req_to_token = torch.randperm(pool_rows * max_len, generator=g).int().reshape(pool_rows, max_len)
    rows = torch.randperm(pool_rows, generator=g)[:bs]
    seq_lens = torch.randint(0, max_len - block + 1, (bs,), generator=g)
    bonus = torch.randint(0, 50, (bs,), generator=g)
    predicted = torch.randint(0, 50, (bs, block), generator=g)
    candidates = torch.cat([bonus[:, None], predicted[:, :-1]], dim=1)
    keep = torch.randint(0, block, (bs,), generator=g)
    wrong = torch.arange(block)[None, :] == keep[:, None] + 1
    candidates = torch.where(wrong, (candidates + 1) % 50, candidates)
    return [t.to(device) for t in (req_to_token, rows, seq_lens, bonus, candidates, predicted)]


def test_chain_references_are_the_torch_step_they_replace():
    """What the worker computed inline before the chain kernels (positions, slots, block ids; greedy acceptance,
    commit lengths, emitted layout), written out here once more, on random inputs."""
    g = torch.Generator().manual_seed(8)
    for bs, block in [(1, 1), (1, 2), (3, 16), (17, 8), (64, 16)]:
        req_to_token, rows, seq_lens, bonus, candidates, predicted = chain_inputs(bs, block, g)
        got = reference.chain_block(bonus, seq_lens, rows, req_to_token, block, 77)
        positions = seq_lens[:, None] + torch.arange(block)
        slots = req_to_token[rows[:, None], positions].long()
        assert torch.equal(got.positions, positions) and torch.equal(got.slots, slots)
        assert torch.equal(got.block_ids, torch.cat([bonus[:, None], torch.full((bs, block - 1), 77)], dim=1))

        step = reference.chain_accept_greedy(candidates, predicted, seq_lens)
        accept_len = (candidates[:, 1:] == predicted[:, :-1]).int().cumprod(1).sum(1, dtype=torch.int32)
        bonus_out = predicted.gather(1, accept_len[:, None].long()).squeeze(1)
        commit_lens = accept_len + 1
        emitted = torch.zeros_like(candidates)
        emitted[:, :-1] = candidates[:, 1:]
        emitted.scatter_(1, accept_len.long()[:, None], bonus_out[:, None])
        emitted = emitted * (torch.arange(block)[None, :] <= accept_len[:, None])
        assert step.accept_len.tolist() == accept_len.tolist() and torch.equal(step.bonus, bonus_out)
        assert torch.equal(step.commit_lens, commit_lens) and torch.equal(step.new_seq_lens, seq_lens + commit_lens)
        assert torch.equal(step.emitted, emitted)
        assert {int(a) for a in step.accept_len} <= set(range(block))


def test_ops_run_the_reference_without_a_gpu(caplog, monkeypatch):
    monkeypatch.setattr(jit, "_logged", set())
    g = torch.Generator().manual_seed(8)
    values, ids = draft_logprobs(2, 3, 10, "continuous", g).topk(2, dim=-1)
    with caplog.at_level("INFO", logger="dflash_sglang.kernels"):
        tree = build_draft_tree(torch.tensor([1, 2]), values, ids, torch.tensor([4, 9]), 5)
        build_draft_tree(torch.tensor([1, 2]), values, ids, torch.tensor([4, 9]), 5)
    assert [r.getMessage() for r in caplog.records] == ["build_draft_tree: torch reference (inputs on cpu)"]
    assert tree.tokens.shape == (2, 6)


# ---------------------------------------------------------------------------------------------------- CPU: compile


CUDA_SOURCES = sorted(p.name for p in (REPO / "csrc").glob("*.cu"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the CUDA sources cannot be compiled")
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_cuda_sources_compile(arch, tmp_path):
    for source in CUDA_SOURCES:
        result = subprocess.run(["nvcc", "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c",
                                 str(REPO / "csrc" / source), "-o", str(tmp_path / f"{source}.o")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"nvcc failed on {source} for sm_{arch}:\n{result.stderr}"


def ninja_missing() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return not is_ninja_available()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: the kernel library cannot be built")
@pytest.mark.skipif(ninja_missing(), reason="ninja is missing: torch.utils.cpp_extension cannot build")
def test_kernel_library_builds_for_sm90a(tmp_path):
    env = {**os.environ, "DFLASH_KERNEL_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "dflash_sglang.kernels", "build", "--arch", "90a"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(tmp_path.glob("dflash_kernels_sm90a_*/*.so"))


# ---------------------------------------------------------------------------------------------------- GPU


def poisoned(buffers):
    """Fill preallocated outputs with garbage so that any entry a kernel leaves unwritten fails the comparison."""
    for t in buffers if isinstance(buffers, tuple) else (buffers,):
        if t.dtype == torch.bool:
            t.fill_(True)
        elif t.is_floating_point():
            t.fill_(float("nan"))
        else:
            t.fill_(-123456789 if t.dtype == torch.int32 else 0x5EADBEEF5EADBEEF)
    return buffers


def assert_same(got, expected):
    for name, a, b in zip(getattr(expected, "_fields", None) or itertools.repeat(""), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), name


BUILD_CASES = [  # bs, depth, topk, budget, kind
    (1, 1, 1, 1, "continuous"), (1, 16, 1, 16, "continuous"), (1, 4, 8, 0, "ties"), (3, 5, 4, 64, "ties"),
    (8, 16, 8, 64, "continuous"), (17, 8, 2, 40, "filtered"), (64, 16, 4, 64, "ties"), (64, 16, 8, 64, "filtered"),
    (5, 3, 3, 100, "continuous"), (2, 16, 16, 256, "ties"), (33, 7, 5, 31, "filtered"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("bs,depth,topk,budget,kind", BUILD_CASES)
def test_build_kernel_matches_reference(cuda, bs, depth, topk, budget, kind):
    g = torch.Generator().manual_seed(bs * 1009 + depth * 101 + topk * 11 + budget + len(kind))
    values, ids = draft_logprobs(bs, depth, 300, kind, g).topk(topk, dim=-1)
    roots = torch.randint(0, 300, (bs,), generator=g)
    start = torch.randint(0, 4000, (bs,), generator=g)
    expected = reference.build_draft_tree(roots, values, ids, start, budget)
    out = poisoned(empty_tree(bs, expected.tokens.shape[1], cuda))
    got = build_draft_tree(roots.to(cuda), values.to(cuda), ids.to(cuda), start.to(cuda), budget, out=out)
    assert_same(got, expected)


VERIFY_CASES = [(1, 2, 1), (1, 17, 16), (8, 33, 6), (32, 65, 16), (64, 65, 16), (64, 17, 4), (13, 65, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("bs,n,depth", VERIFY_CASES)
def test_greedy_kernel_matches_reference(cuda, bs, n, depth):
    g = torch.Generator().manual_seed(bs * 1000 + n)
    for vocab in (3, 50):
        tokens, parents, first_child, next_sibling = random_tree(bs, n, depth, vocab, g)
        predict = follow_predictions(tokens, parents, vocab, 0.85, g)
        expected = reference.verify_tree_greedy(tokens, first_child, next_sibling, predict, depth)
        out = poisoned(empty_verify(bs, depth, cuda))
        got = verify_tree_greedy(tokens.to(cuda), first_child.to(cuda), next_sibling.to(cuda), predict.to(cuda),
                                 depth, out=out)
        assert_same(got, expected)
    # DDTree-shaped trees from the build kernel, verified in place on the GPU.
    values, ids = draft_logprobs(bs, depth, 40, "continuous", g).topk(4, dim=-1)
    tree = build_draft_tree(torch.randint(0, 40, (bs,), generator=g).to(cuda), values.to(cuda), ids.to(cuda),
                            torch.zeros(bs, dtype=torch.long, device=cuda), n - 1)
    predict = follow_predictions(tree.tokens.cpu(), tree.parents.cpu(), 40, 0.85, g).to(cuda)
    got = verify_tree_greedy(tree.tokens, tree.first_child, tree.next_sibling, predict, depth)
    expected = reference.verify_tree_greedy(tree.tokens, tree.first_child, tree.next_sibling, predict, depth)
    assert_same(got, expected)


def sampling_probs_for(tokens: torch.Tensor, parents: torch.Tensor, vocab: int, device, seed: int) -> torch.Tensor:
    """[bs, n, V] top-20 filtered target rows (exact zeros) that favour each node's children, so paths get long."""
    bs, n = tokens.shape
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn((bs, n, vocab), generator=g, device=device) * 2
    boost = torch.full((bs, n), 4.0, device=device)
    boost[:, 0] = 0.0  # the root is nobody's child
    rows = torch.arange(bs, device=device)[:, None].expand(bs, n)
    logits.index_put_((rows, parents.long().clamp(min=0).to(device), tokens.to(device)), boost, accumulate=True)
    kth = logits.topk(min(20, vocab), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)


SAMPLING_CASES = [(1, 9, 3, 7), (4, 17, 16, 4099), (8, 33, 6, 4096), (64, 65, 16, 1000), (3, 65, 16, 151_936),
                  (64, 17, 8, 151_936)]


@pytest.mark.gpu
@pytest.mark.parametrize("bs,n,depth,vocab", SAMPLING_CASES)
def test_sampling_kernel_matches_reference(cuda, bs, n, depth, vocab):
    g = torch.Generator().manual_seed(bs * 7 + n * 3 + vocab)
    tokens, parents, first_child, next_sibling = random_tree(bs, n, depth, min(vocab, 60), g)
    probs = sampling_probs_for(tokens, parents, vocab, cuda, seed=n)
    inputs = [t.to(cuda) for t in (tokens, first_child, next_sibling)]
    for _ in range(3):
        coins, race = draw_verify_randoms(bs, n, vocab, cuda)
        expected = reference.verify_tree_sampling(*inputs, probs, coins, race, depth)
        out = poisoned(empty_verify(bs, depth, cuda))
        got = verify_tree_sampling(*inputs, probs, coins, race, depth, out=out)
        assert_same(got, expected)


@pytest.mark.gpu
def test_sampling_kernel_law(cuda):
    pytest.importorskip("scipy", reason="scipy is needed for the chi-square test")
    tokens, parents, probs = law_inputs()
    law = exact_law(tokens, parents, probs)
    cells = sorted(law)
    expected = torch.tensor([law[c] for c in cells], dtype=torch.float64)
    first_child, next_sibling = tree_links(parents[None])
    rows = 200_000
    coins, race = draw_verify_randoms(rows, len(LAW_TOKENS), LAW_VOCAB, cuda)
    got = verify_tree_sampling(tokens.to(cuda).expand(rows, -1), first_child.to(cuda).expand(rows, -1).contiguous(),
                               next_sibling.to(cuda).expand(rows, -1).contiguous(),
                               probs.to(cuda).expand(rows, -1, -1).contiguous(), coins, race, LAW_DEPTH)
    assert chi_square_pvalue(emitted_counts(got.emitted.cpu(), cells), expected) > ALPHA


COMMIT_CASES = [(1, 2, 1), (1, 17, 16), (17, 33, 8), (64, 65, 16), (64, 17, 16), (5, 65, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("bs,n,depth", COMMIT_CASES)
def test_commit_kernel_matches_reference(cuda, bs, n, depth):
    g = torch.Generator().manual_seed(bs * 100 + n)
    req_to_token, rpi, seq_lens, path, accept, emitted = commit_inputs(bs, n, depth, g, cuda)
    expected_table = req_to_token.clone()
    expected = reference.commit_tree(expected_table, rpi, seq_lens, path, accept, emitted, n)
    out = poisoned(empty_tree_commit(bs, depth, cuda))
    got = commit_tree(req_to_token, rpi, seq_lens, path, accept, emitted, n, out=out)
    assert_same(got, expected)
    assert torch.equal(req_to_token, expected_table)  # the whole table: no stray writes


VERIFY_INPUT_CASES = [(1, 1, 0, 0), (1, 17, 40, 3), (3, 5, 9, 7), (17, 33, 3000, 0), (64, 65, 2000, 1000),
                      (200, 17, 500, 5)]  # bs, n, longest committed length, tail


@pytest.mark.gpu
@pytest.mark.parametrize("bs,n,max_len,tail", VERIFY_INPUT_CASES)
def test_verify_inputs_kernel_matches_reference(cuda, bs, n, max_len, tail):
    g = torch.Generator().manual_seed(bs * 7 + n + tail)
    ancestor = (torch.rand((bs, n, n), generator=g) < 0.5).to(cuda)
    seq_lens = torch.randint(0, max_len + 1, (bs,), generator=g).to(cuda)
    table = torch.randperm((bs + 3) * (max_len + n), generator=g).int().view(bs + 3, -1).to(cuda)
    rows = torch.randperm(bs + 3, generator=g)[:bs].to(cuda)
    size = int(n * (seq_lens + n).sum()) + tail
    expected = reference.tree_verify_inputs(ancestor, seq_lens, rows, table, size)
    for garbage in (True, False):  # a bool output can only be poisoned with one of its two values at a time
        out = poisoned(empty_verify_inputs(bs, n, size, cuda))
        out.mask.fill_(garbage)
        assert_same(tree_verify_inputs(ancestor, seq_lens, rows, table, size, out=out), expected)


CHAIN_CASES = [(1, 1), (1, 2), (1, 16), (7, 16), (64, 16), (129, 8), (300, 33)]  # bs, B


@pytest.mark.gpu
@pytest.mark.parametrize("bs,block", CHAIN_CASES)
def test_chain_kernels_match_reference(cuda, bs, block):
    g = torch.Generator().manual_seed(bs * 1000 + block)
    req_to_token, rows, seq_lens, bonus, candidates, predicted = chain_inputs(bs, block, g, cuda)
    expected_block = reference.chain_block(bonus, seq_lens, rows, req_to_token, block, 49_999)
    got_block = chain_block(bonus, seq_lens, rows, req_to_token, block, 49_999,
                            out=poisoned(empty_chain_block(bs, block, cuda)))
    assert_same(got_block, expected_block)
    expected = reference.chain_accept_greedy(candidates, predicted, seq_lens)
    got = chain_accept_greedy(candidates, predicted, seq_lens, out=poisoned(empty_chain_step(bs, block, cuda)))
    assert_same(got, expected)


@pytest.mark.gpu
def test_ops_capture_in_a_cuda_graph(cuda):
    """A whole speculative step's kernels replay from a CUDA graph: no host sync, no data-dependent shapes."""
    g = torch.Generator().manual_seed(9)
    bs, depth, topk, budget, vocab = 8, 8, 4, 32, 1000
    n = budget + 1
    values, ids = (t.to(cuda) for t in draft_logprobs(bs, depth, vocab, "continuous", g).topk(topk, dim=-1))
    roots = torch.randint(0, vocab, (bs,), generator=g).to(cuda)
    req_to_token, rpi, seq_lens, _, _, _ = commit_inputs(bs, n, depth, g, cuda)
    mask_size = int(n * (seq_lens + n).sum()) + 64
    probs = torch.randn(bs, n, vocab, generator=g).softmax(-1).to(cuda)
    coins, race = draw_verify_randoms(bs, n, vocab, cuda)

    chain_table, chain_rows, chain_lens, chain_bonus, candidates, predicted = chain_inputs(bs, 16, g, cuda)

    def step(table):
        block = chain_block(chain_bonus, chain_lens, chain_rows, chain_table, 16, 7)
        chain = chain_accept_greedy(candidates, predicted, chain_lens)
        tree = build_draft_tree(roots, values, ids, seq_lens, budget)
        inputs = tree_verify_inputs(tree.ancestor_mask, seq_lens, rpi, table, mask_size)
        predict = probs.argmax(-1)
        greedy = verify_tree_greedy(tree.tokens, tree.first_child, tree.next_sibling, predict, depth)
        sampled = verify_tree_sampling(tree.tokens, tree.first_child, tree.next_sibling, probs, coins, race, depth)
        committed = commit_tree(table, rpi, seq_lens, sampled.path, sampled.accept_len, sampled.emitted, n)
        return [*block, *chain, *tree, *inputs, *greedy, *sampled, *committed]

    eager_table, graph_table = req_to_token.clone(), req_to_token.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(req_to_token.clone())  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(graph_table)
    expected = step(eager_table)
    graph_table.copy_(req_to_token)
    graph.replay()
    for a, b in zip(captured, expected, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(graph_table, eager_table)
