"""Draft trees from one DFlash pass (DDTree-style best-first expansion), and the chain as a degenerate tree.

A DFlash pass gives a distribution per block depth that does not depend on the tokens chosen at earlier
depths, so a tree is a set of prefixes of per-depth top-k ranks. Best-first expansion by cumulative
log-probability under a node budget: pop the best prefix, then offer its next sibling (same depth, next rank)
and its first child (next depth, rank 0). Node 0 is the root (the anchor token, already emitted); nodes are
numbered in pop order, so a parent always precedes its children and siblings appear in rank order.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """`n` = budget + 1 nodes per request; node 0 is the root. All tensors are [bs, n] (mask [bs, n, n])."""

    tokens: torch.Tensor
    parents: torch.Tensor  # -1 for the root
    depths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]

    def ancestor_mask(self) -> torch.Tensor:
        """[b, i, j] True iff node j is node i or one of its ancestors (the verify attention mask)."""
        bs, n = self.tokens.shape
        mask = torch.eye(n, dtype=torch.bool, device=self.tokens.device).expand(bs, n, n).clone()
        # Parents precede children, so one pass in node order inherits the complete ancestor set.
        for i in range(1, n):
            parent = self.parents[:, i].clamp(min=0)
            mask[:, i] |= mask[torch.arange(bs), parent]
        return mask

    def children(self, row: int) -> list[list[int]]:
        """Per node, its children in sibling order (rank order)."""
        kids: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for i, p in enumerate(self.parents[row].tolist()):
            if p >= 0:
                kids[p].append(i)
        return kids


def max_tree_nodes(depth: int, topk: int) -> int:
    return sum(topk ** d for d in range(1, depth + 1))


def best_first_nodes(values: list[list[float]], budget: int) -> list[tuple[int, int, int]]:
    """(parent, depth, rank) of nodes 1..budget of one request, in pop order.

    `values[d][r]` is the log-prob of rank r at depth d+1 (ranks descending). Ties in score resolve by insertion
    order, so the result is deterministic (the CUDA kernel replays exactly this heap).
    """
    depth, topk = len(values), len(values[0])
    heap = [(-values[0][0], 0, 1, 0, 0)]  # (-score, insertion order, depth (1-based), rank, parent node)
    order, nodes = 1, []
    for node in range(1, budget + 1):
        neg_score, _, d, r, parent = heapq.heappop(heap)
        nodes.append((parent, d, r))
        if r + 1 < topk:
            heapq.heappush(heap, (neg_score + values[d - 1][r] - values[d - 1][r + 1], order, d, r + 1, parent))
            order += 1
        if d < depth:
            heapq.heappush(heap, (neg_score - values[d][0], order, d + 1, 0, node))
            order += 1
    return nodes


def build_tree(root_tokens: torch.Tensor, draft_logprobs: torch.Tensor, budget: int, topk: int) -> DraftTree:
    """root_tokens [bs]; draft_logprobs [bs, D, V] for depths 1..D -> a tree of budget non-root nodes."""
    bs, depth, _ = draft_logprobs.shape
    budget = min(budget, max_tree_nodes(depth, topk))
    values, ranks = draft_logprobs.float().topk(topk, dim=-1)
    values, ranks = values.cpu().tolist(), ranks.cpu().tolist()
    tokens = torch.empty(bs, budget + 1, dtype=torch.long)
    parents = torch.empty_like(tokens)
    depths = torch.empty_like(tokens)
    tokens[:, 0] = root_tokens.cpu()
    parents[:, 0] = -1
    depths[:, 0] = 0
    for b in range(bs):
        for node, (parent, d, r) in enumerate(best_first_nodes(values[b], budget), start=1):
            tokens[b, node], parents[b, node], depths[b, node] = ranks[b][d - 1][r], parent, d
    dev = draft_logprobs.device
    return DraftTree(tokens.to(dev), parents.to(dev), depths.to(dev))


def chain_tree(root_tokens: torch.Tensor, draft_tokens: torch.Tensor) -> DraftTree:
    """The DFlash chain `[anchor, d1 .. d_{B-1}]` as a tree whose node i has parent i-1."""
    bs, depth = draft_tokens.shape
    dev = draft_tokens.device
    tokens = torch.cat([root_tokens[:, None], draft_tokens], dim=1)
    steps = torch.arange(depth + 1, device=dev).expand(bs, -1)
    return DraftTree(tokens, steps - 1, steps.clone())
