"""Tree verification, its inputs (KV slots and custom mask) and the greedy and lossless sampling verifiers: the CUDA
kernels or their references."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import VerifyInputs, VerifyResult, empty_verify, empty_verify_inputs, fill
from dflash_sglang.kernels.jit import use_kernel


def tree_verify_inputs(ancestor_mask: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                       req_to_token: torch.Tensor, mask_size: int, out: VerifyInputs | None = None) -> VerifyInputs:
    """The KV slots and the custom attention mask of a tree verify.

    Parameters:
        ancestor_mask: [bs, n, n] bool, [b, i, j] iff node j is node i or one of its ancestors.
        seq_lens: [bs] committed lengths (the root's position); req_pool_indices: [bs] slot-table rows.
        req_to_token: [R, max_len] int32 slot table, rows holding seq_len + n entries.
        mask_size: a host-side bound >= sum_b n * (seq_len_b + n) (the planning lengths).
        out: optional preallocated `VerifyInputs` (`buffers.empty_verify_inputs`).

    Returns `VerifyInputs`: slots [bs, n] int64 = req_to_token[r, seq_len + j], and mask [mask_size] bool in the
    layout of SGLang's triton backend: request b owns n rows of (seq_len_b + n) entries, requests back to back;
    row i sees every committed token and node j iff ancestor_mask[b, i, j]; the tail is 1.
    """
    if not use_kernel("tree_verify_inputs", ancestor_mask):
        return fill(out, reference.tree_verify_inputs(ancestor_mask, seq_lens, req_pool_indices, req_to_token,
                                                      mask_size))
    bs, width = ancestor_mask.shape[:2]
    out = out if out is not None else empty_verify_inputs(bs, width, mask_size, ancestor_mask.device)
    torch.ops.dflash_sglang.tree_verify_inputs(ancestor_mask.bool().contiguous(), seq_lens.long().contiguous(),
                                               req_pool_indices.long().contiguous(), req_to_token, *out)
    return out


def verify_tree_greedy(tokens: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                       target_predict: torch.Tensor, max_depth: int, out: VerifyResult | None = None) -> VerifyResult:
    """Accept, from the root, the first child whose token is the target's argmax at the current node.

    Parameters:
        tokens, first_child, next_sibling: [bs, n] tree (int64, int32, int32), as `build_draft_tree` makes them.
        target_predict: [bs, n] int64, the target's argmax after each node.
        max_depth: D, the deepest node; outputs have D + 1 columns.
        out: optional preallocated `VerifyResult` (`buffers.empty_verify`).

    Returns `VerifyResult`: path [bs, D+1] int32, accept_len [bs] int32, bonus [bs] int64 (the argmax at the last
    accepted node), emitted [bs, D+1] int64 (accepted draft tokens, bonus, -1 padding).
    """
    if not use_kernel("verify_tree_greedy", tokens):
        return fill(out, reference.verify_tree_greedy(tokens, first_child, next_sibling, target_predict, max_depth))
    out = out if out is not None else empty_verify(tokens.shape[0], max_depth, tokens.device)
    torch.ops.dflash_sglang.verify_tree_greedy(tokens.long().contiguous(), first_child.int().contiguous(),
                                               next_sibling.int().contiguous(), target_predict.long().contiguous(),
                                               *out)
    return out


def draw_verify_randoms(bs: int, num_nodes: int, vocab: int, device,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coins [bs, n] uniform in [0, 1), race [bs, V] Exp(1)) for `verify_tree_sampling`."""
    coins = torch.rand((bs, num_nodes), device=device, generator=generator)
    race = torch.empty((bs, vocab), device=device).exponential_(generator=generator)
    return coins, race


def verify_tree_sampling(tokens: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                         target_probs: torch.Tensor, coins: torch.Tensor, race: torch.Tensor, max_depth: int,
                         out: VerifyResult | None = None) -> VerifyResult:
    """Lossless multi-candidate speculative sampling of the tree's deterministic candidates.

    Parameters:
        tokens, first_child, next_sibling: [bs, n] tree.
        target_probs: [bs, n, V] float32, the target's sampling distribution after each node (temperature, top-k,
            top-p already applied; rows sum to 1).
        coins: [bs, n] float32 uniforms in [0, 1); coins[b, c] decides child c when it is tried.
        race: [bs, V] float32 Exp(1) variates for the bonus (`draw_verify_randoms` makes both).
        max_depth: D; outputs have D + 1 columns.
        out: optional preallocated `VerifyResult`.

    Each emitted token is distributed exactly as the target's: child c is accepted with probability
    p(c) / (residual mass), else its mass is removed and the next sibling is tried; the bonus is drawn from the
    residual at the last accepted node. See `reference.verify_tree_sampling` for the exact arithmetic.
    """
    if not use_kernel("verify_tree_sampling", tokens):
        return fill(out, reference.verify_tree_sampling(tokens, first_child, next_sibling, target_probs, coins, race,
                                                        max_depth))
    out = out if out is not None else empty_verify(tokens.shape[0], max_depth, tokens.device)
    torch.ops.dflash_sglang.verify_tree_sampling(tokens.long().contiguous(), first_child.int().contiguous(),
                                                 next_sibling.int().contiguous(),
                                                 target_probs.float().contiguous(), coins.float().contiguous(),
                                                 race.float().contiguous(), *out)
    return out
