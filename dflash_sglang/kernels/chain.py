"""The chain step's block before the drafter and its greedy acceptance after the verify: CUDA kernels or
references (one launch each where the torch path takes about six and a dozen). `chain_step` gives the same
outputs from a sampled acceptance, in torch."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import ChainBlock, ChainStep, empty_chain_block, empty_chain_step, fill
from dflash_sglang.kernels.jit import use_kernel
from dflash_sglang.kernels.reference import chain_step  # what a sampled acceptance commits: torch only


def chain_block(bonus: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                req_to_token: torch.Tensor, block_size: int, mask_token_id: int,
                out: ChainBlock | None = None) -> ChainBlock:
    """Each request's draft block [anchor, MASK x (B-1)] at positions seq_len + j and the slots reserved there.

    Parameters:
        bonus: [bs] int64 the anchor (last step's bonus token); seq_lens: [bs] int64 committed lengths.
        req_pool_indices: [bs] int64 slot-table rows; req_to_token: [R, max_len] int32, rows holding seq_len + B.
        out: optional preallocated `ChainBlock` (`buffers.empty_chain_block`).
    """
    if not use_kernel("chain_block", seq_lens):
        return fill(out, reference.chain_block(bonus, seq_lens, req_pool_indices, req_to_token, block_size,
                                               mask_token_id))
    out = out if out is not None else empty_chain_block(seq_lens.shape[0], block_size, seq_lens.device)
    torch.ops.dflash_sglang.chain_block(bonus.long().contiguous(), seq_lens.long().contiguous(),
                                        req_pool_indices.long().contiguous(), req_to_token, int(mask_token_id), *out)
    return out


def chain_accept_greedy(candidates: torch.Tensor, predicted: torch.Tensor, seq_lens: torch.Tensor,
                        out: ChainStep | None = None) -> ChainStep:
    """Greedy acceptance of candidates [bs, B] = [anchor, d_1 .. d_{B-1}] against the target's argmax at each verify
    row (`predicted` [bs, B]): d_j is kept while it equals predicted[j - 1]; see `buffers.ChainStep` for what
    comes back. out: optional `buffers.empty_chain_step`."""
    if not use_kernel("chain_accept_greedy", candidates):
        return fill(out, reference.chain_accept_greedy(candidates, predicted, seq_lens))
    bs, block = candidates.shape
    out = out if out is not None else empty_chain_step(bs, block, candidates.device)
    torch.ops.dflash_sglang.chain_accept_greedy(candidates.long().contiguous(), predicted.long().contiguous(),
                                                seq_lens.long().contiguous(), *out)
    return out


__all__ = ["chain_accept_greedy", "chain_block", "chain_step"]
