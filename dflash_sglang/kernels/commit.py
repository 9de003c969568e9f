"""Commit of a verified tree (slot permutation, no KV copy): a CUDA kernel or its reference."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import TreeCommit, empty_tree_commit, fill
from dflash_sglang.kernels.jit import use_kernel


def commit_tree(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, path: torch.Tensor,
                accept_len: torch.Tensor, verified_emitted: torch.Tensor, num_nodes: int,
                out: TreeCommit | None = None) -> TreeCommit:
    """Commit a verified tree: permute each request's verify columns in place, path first, and return what the
    step hands on.

    Parameters:
        req_to_token: [R, max_len] int32 slot table; the verify pass wrote node j's KV to the slot at
            req_to_token[r, seq_len + j], j < n. Rows must hold seq_len + n entries.
        req_pool_indices: [bs] row of each request; seq_lens: [bs] committed lengths (the root's position).
        path, accept_len, verified_emitted: [bs, D+1] int32, [bs] int32 and [bs, D+1] int64 from a verifier.
        num_nodes: n, tree nodes per request.
        out: optional preallocated `TreeCommit` (`buffers.empty_tree_commit`).

    After it, req_to_token[r, seq_len + i] holds the slot of path node i for i <= accept_len (its KV was computed
    at exactly that position), then the other nodes' slots in node order: a permutation of the reserved slots,
    so nothing is copied, freed or leaked. The drafter's context K/V, written at every node's slot during the
    verify (sglang/verify_context.py), moves with the slots. Returns `TreeCommit` (commit lengths, new lengths,
    emitted tokens with zeros for padding).
    """
    if not use_kernel("commit_tree", req_to_token):
        return fill(out, reference.commit_tree(req_to_token, req_pool_indices, seq_lens, path, accept_len,
                                               verified_emitted, num_nodes))
    out = out if out is not None else empty_tree_commit(path.shape[0], path.shape[1] - 1, req_to_token.device)
    torch.ops.dflash_sglang.commit_tree(req_to_token, req_pool_indices.long().contiguous(),
                                        seq_lens.long().contiguous(), path.int().contiguous(),
                                        accept_len.int().contiguous(), verified_emitted.long().contiguous(),
                                        int(num_nodes), *out)
    return out

