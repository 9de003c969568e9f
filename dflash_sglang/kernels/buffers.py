"""Fixed-size, padded outputs of the ops, shared by the kernels and their references.

Tree ops: one request per row; node 0 is the root (the anchor token, already emitted), nodes 1..n-1 are drafts;
-1 pads every index or token that does not exist. Context K/V: layer-major keys and values of the drafter.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TreeBuffers(NamedTuple):
    """A batch of draft trees in the layout the verifiers walk."""

    tokens: torch.Tensor  # [bs, n] int64
    parents: torch.Tensor  # [bs, n] int32, -1 for the root
    depths: torch.Tensor  # [bs, n] int32, 0 for the root
    positions: torch.Tensor  # [bs, n] int64, start position + depth
    first_child: torch.Tensor  # [bs, n] int32, lowest-index child, -1 for a leaf
    next_sibling: torch.Tensor  # [bs, n] int32, next child of the same parent, -1 after the last (and the root)
    ancestor_mask: torch.Tensor  # [bs, n, n] bool, [b, i, j] iff j is i or an ancestor of i


class VerifyResult(NamedTuple):
    path: torch.Tensor  # [bs, D+1] int32 accepted root path, root first, -1 padded
    accept_len: torch.Tensor  # [bs] int32 accepted draft nodes
    bonus: torch.Tensor  # [bs] int64 target token emitted after them
    emitted: torch.Tensor  # [bs, D+1] int64 accepted draft tokens, the bonus, then -1


class VerifyInputs(NamedTuple):
    """What a tree verify reads besides its tokens and positions."""

    slots: torch.Tensor  # [bs, n] int64: the KV slots reserved at seq_len + j, where node j's KV goes
    mask: torch.Tensor  # [size] bool: the triton backend's flat custom mask (see `tree_verify_inputs`)


class TreeCommit(NamedTuple):
    """A verified tree's commit: what SGLang needs of it."""

    commit_lens: torch.Tensor  # [bs] int32: accept_len + 1 (the root and the accepted nodes enter the caches)
    new_seq_lens: torch.Tensor  # [bs] int64: seq_len + commit_len
    emitted: torch.Tensor  # [bs, D+1] int64: accepted drafts, the bonus, zeros (SGLang's spec-v2 layout)


class ChainBlock(NamedTuple):
    """A chain step's draft block: what the drafter reads and where its rows (and later the verify's) live."""

    block_ids: torch.Tensor  # [bs, B] int64: the anchor (last step's bonus), then the mask token
    positions: torch.Tensor  # [bs, B] int64: seq_len + j
    slots: torch.Tensor  # [bs, B] int64: the KV slots reserved at those positions


class ChainStep(NamedTuple):
    """A verified chain's acceptance and what its commit needs."""

    accept_len: torch.Tensor  # [bs] int32: leading drafts kept
    commit_lens: torch.Tensor  # [bs] int32: accept_len + 1 (the anchor and the kept drafts enter the caches)
    bonus: torch.Tensor  # [bs] int64: the target's token after them, the next anchor
    new_seq_lens: torch.Tensor  # [bs] int64: seq_len + commit_len
    emitted: torch.Tensor  # [bs, B] int64: kept drafts, the bonus at accept_len, zeros (SGLang's spec-v2 layout)


class ContextKV(NamedTuple):
    """The drafter's context K/V, layer-major so that each layer's slice is contiguous for the KV pool's store."""

    keys: torch.Tensor  # [L, N, kv_heads, head_dim], RMSNormed and rotated
    values: torch.Tensor  # [L, N, kv_heads, head_dim]


def empty_tree(bs: int, n: int, device) -> TreeBuffers:
    def ints(dtype):
        return torch.empty((bs, n), dtype=dtype, device=device)

    return TreeBuffers(ints(torch.long), ints(torch.int32), ints(torch.int32), ints(torch.long), ints(torch.int32),
                       ints(torch.int32), torch.empty((bs, n, n), dtype=torch.bool, device=device))


def empty_verify(bs: int, max_depth: int, device) -> VerifyResult:
    width = max_depth + 1
    return VerifyResult(torch.empty((bs, width), dtype=torch.int32, device=device),
                        torch.empty(bs, dtype=torch.int32, device=device),
                        torch.empty(bs, dtype=torch.long, device=device),
                        torch.empty((bs, width), dtype=torch.long, device=device))


def empty_verify_inputs(bs: int, num_nodes: int, mask_size: int, device) -> VerifyInputs:
    return VerifyInputs(torch.empty((bs, num_nodes), dtype=torch.long, device=device),
                        torch.empty(mask_size, dtype=torch.bool, device=device))


def empty_tree_commit(bs: int, max_depth: int, device) -> TreeCommit:
    width = max_depth + 1

    def per_request(dtype):
        return torch.empty(bs, dtype=dtype, device=device)

    return TreeCommit(per_request(torch.int32), per_request(torch.long),
                      torch.empty((bs, width), dtype=torch.long, device=device))


def empty_chain_block(bs: int, block_size: int, device) -> ChainBlock:
    return ChainBlock(*(torch.empty((bs, block_size), dtype=torch.long, device=device) for _ in range(3)))


def empty_chain_step(bs: int, block_size: int, device) -> ChainStep:
    def per_request(dtype):
        return torch.empty(bs, dtype=dtype, device=device)

    return ChainStep(per_request(torch.int32), per_request(torch.int32), per_request(torch.long),
                     per_request(torch.long), torch.empty((bs, block_size), dtype=torch.long, device=device))


def empty_context_kv(num_layers: int, num_tokens: int, kv_heads: int, head_dim: int, dtype, device) -> ContextKV:
    shape = (num_layers, num_tokens, kv_heads, head_dim)
    return ContextKV(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))


def fill(out, result):
    """`result` copied into the caller's buffers `out` (same structure), or `result` itself when `out` is None."""
    if out is None:
        return result
    if isinstance(out, torch.Tensor):
        return out.copy_(result)
    for dst, src in zip(out, result, strict=True):
        dst.copy_(src)
    return out
