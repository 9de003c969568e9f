"""Commit of the accepted path (slot remap, no KV copy) and gather of its hidden rows: CUDA kernels or references."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import CommitResult, empty_commit, fill
from dflash_sglang.kernels.jit import use_kernel


def commit_accepted(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                    path: torch.Tensor, accept_len: torch.Tensor, num_nodes: int,
                    out: CommitResult | None = None) -> CommitResult:
    """Rewrite req_to_token[r, seq_len + i] to the verify slot of path node i (i <= accept_len), in place.

    Parameters:
        req_to_token: [R, max_len] int32 slot table; the verify pass wrote node j's KV to the slot at
            req_to_token[r, seq_len + j], j < n. Rows must hold seq_len + n entries.
        req_pool_indices: [bs] int64 row of each request; seq_lens: [bs] int64 committed lengths (the root's
            position).
        path, accept_len: [bs, D+1] int32 and [bs] int32 from a verifier.
        num_nodes: n, tree nodes per request.
        out: optional preallocated `CommitResult` (`buffers.empty_commit`).

    Returns `CommitResult`: freed_slots [bs, n-1] int32 (slots of rejected nodes in node order, -1 padded; the
    caller returns them to its allocator) and new_seq_lens [bs] int64 = seq_len + accept_len + 1. Entries of
    req_to_token past the new length keep stale slots and are never read.
    """
    if not use_kernel("commit_accepted", req_to_token):
        return fill(out, reference.commit_accepted(req_to_token, req_pool_indices, seq_lens, path, accept_len,
                                                   num_nodes))
    out = out if out is not None else empty_commit(path.shape[0], num_nodes, req_to_token.device)
    torch.ops.dflash_sglang.commit_accepted(req_to_token, req_pool_indices.long().contiguous(),
                                            seq_lens.long().contiguous(), path.int().contiguous(),
                                            accept_len.int().contiguous(), *out)
    return out


def gather_accepted_hidden(hidden: torch.Tensor, path: torch.Tensor, accept_len: torch.Tensor,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden features of the accepted path nodes, the next draft context.

    Parameters:
        hidden: [bs * n, F] verify hidden rows in tree-node order (any dtype; rows contiguous, any row stride).
        path, accept_len: [bs, D+1] int32 and [bs] int32 from a verifier.
        out: optional preallocated [bs, D+1, F] of hidden's dtype.

    Returns [bs, D+1, F]: row i is hidden[b * n + path[b, i]] for i <= accept_len, zeros after.
    """
    if not use_kernel("gather_accepted_hidden", hidden):
        return fill(out, reference.gather_accepted_hidden(hidden, path, accept_len))
    bs, width = path.shape
    out = out if out is not None else hidden.new_empty((bs, width, hidden.shape[1]))
    torch.ops.dflash_sglang.gather_accepted_hidden(hidden, path.int().contiguous(), accept_len.int().contiguous(), out)
    return out
