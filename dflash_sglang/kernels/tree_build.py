"""DDTree build from per-depth top-k: the CUDA kernel (one CTA per request) or its reference."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import TreeBuffers, empty_tree, fill
from dflash_sglang.kernels.jit import use_kernel


def build_draft_tree(root_tokens: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                     start_positions: torch.Tensor, budget: int, out: TreeBuffers | None = None) -> TreeBuffers:
    """Best-first tree of `budget` draft nodes over per-depth top-k ranks, identical to `tree.build_tree`.

    Parameters:
        root_tokens: [bs] int64, the anchor token of each request (node 0).
        topk_logprobs: [bs, D, K] float32, log-probs of the top-k tokens per block depth 1..D, descending.
        topk_ids: [bs, D, K] int64, their token ids.
        start_positions: [bs] int64, position of the root; node positions are start + depth.
        budget: draft nodes per request; capped at the number of distinct rank prefixes (at most 256 on the GPU).
        out: optional preallocated buffers of n = 1 + capped budget nodes (`buffers.empty_tree`).

    Returns `TreeBuffers` [bs, n]: nodes numbered in pop order (parents before children, siblings in rank
    order), positions, first_child/next_sibling lists, and the bool ancestor mask [bs, n, n] (attention mask
    of the verify pass over the tree).
    """
    bs, depth, topk = topk_logprobs.shape
    n = reference.tree_num_nodes(depth, topk, budget)
    if not use_kernel("build_draft_tree", topk_logprobs):
        return fill(out, reference.build_draft_tree(root_tokens, topk_logprobs, topk_ids, start_positions, budget))
    out = out if out is not None else empty_tree(bs, n, topk_logprobs.device)
    torch.ops.dflash_sglang.build_tree(root_tokens.long().contiguous(), topk_logprobs.float().contiguous(),
                                       topk_ids.long().contiguous(), start_positions.long().contiguous(), n - 1, *out)
    return out
