"""Pure-torch references of the kernels in `csrc/`: the specification they are tested against, and what runs where
they cannot (no GPU, no compiler).

Each reference takes the kernel's inputs, randomness included: the sampling verifier consumes explicit `coins`
[bs, n] (uniform in [0, 1); `coins[b, c]` decides child c when it is tried, and each child is tried at most once)
and `race` [bs, V] (Exp(1) variates; the bonus is the argmax of p / race over the residual, which samples it with
probability proportional to p). Given the same tensors a kernel and its reference agree bit for bit; the law is
checked against `dflash_sglang.verify.sampling_verify_tree`, which draws its own randomness.

The drafter's context K/V reference (`context_kv_norm_rope`) is the torch path the SGLang drafter ran before its
kernel, unchanged: RMSNorm in float32 rounded to the kv dtype (the norm's output dtype, as in the reference
drafter), neox RoPE from SGLang's cos/sin cache in float32 rounded once more, layer-major copies. Its kernel
does the same float operations, except that its float32 `1 / rms` (another summation order) may differ in the
last bit, which moves a 16-bit key by one rounding step now and then; values agree bit for bit.

All but the tree build are batched tensor programs with a fixed number of steps: no host synchronization and
fixed output shapes, on any device. The tree build replays Python's heapq exactly as `tree.build_tree` does: its
node order (ties by insertion order, and the heap's order for NaN scores, which -inf log-probs of filtered
sampling distributions produce) is defined by that heap. It runs on the host.
"""

from __future__ import annotations

import torch

from dflash_sglang.kernels.buffers import (ChainBlock, ChainStep, ContextKV, TreeBuffers, TreeCommit, VerifyInputs,
                                          VerifyResult)
from dflash_sglang.tree import best_first_nodes, max_tree_nodes


def tree_num_nodes(depth: int, topk: int, budget: int) -> int:
    """Nodes of a built tree, root included: the budget is capped by the number of distinct rank prefixes."""
    return 1 + min(budget, max_tree_nodes(depth, topk))


def tree_links(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """first_child, next_sibling [bs, n] int32 of parent-before-child trees whose children are in index order."""
    bs, n = parents.shape
    idx = torch.arange(n, device=parents.device)
    parents = parents.long()
    is_child = parents[:, None, :] == idx[None, :, None]  # [b, i, c]: c is a child of i
    first_child = torch.where(is_child, idx, n).amin(dim=2)
    same_parent = (parents[:, None, :] == parents[:, :, None]) & (idx[None, :] > idx[:, None])[None]
    same_parent &= (idx > 0)[None, :, None]  # the root has no siblings
    next_sibling = torch.where(same_parent, idx, n).amin(dim=2)
    return (torch.where(first_child < n, first_child, -1).int(), torch.where(next_sibling < n, next_sibling, -1).int())


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[bs, n, n] bool, [b, i, j] iff j is i or an ancestor of i; `max_depth` bounds the depth of every node."""
    bs, n = parents.shape
    parents = parents.long()
    mask = torch.zeros((bs, n, n), dtype=torch.bool, device=parents.device)
    node = torch.arange(n, device=parents.device).expand(bs, n)
    for _ in range(max_depth + 1):
        # Past the root the walk sits at -1, clamped to the root: marking the root again is harmless.
        mask.scatter_(2, node.clamp(min=0)[..., None], True)
        node = torch.where(node >= 0, parents.gather(1, node.clamp(min=0)), node)
    return mask


def build_draft_tree(root_tokens: torch.Tensor, topk_logprobs: torch.Tensor, topk_ids: torch.Tensor,
                     start_positions: torch.Tensor, budget: int) -> TreeBuffers:
    """DDTree best-first tree from per-depth top-k log-probs/ids [bs, D, K] (ranks in descending order).

    Pop the best prefix (score = sum of its log-probs), then offer its next sibling and its first child; nodes are
    numbered in pop order. Identical to `tree.build_tree` fed the full log-probs whose top-k these are.
    """
    bs, depth, topk = topk_logprobs.shape
    n = tree_num_nodes(depth, topk, budget)
    values = topk_logprobs.float().cpu().tolist()
    parents = [[-1] * n for _ in range(bs)]
    depths = [[0] * n for _ in range(bs)]
    ranks = [[0] * n for _ in range(bs)]
    for b in range(bs):
        for node, (parent, d, r) in enumerate(best_first_nodes(values[b], n - 1), start=1):
            parents[b][node], depths[b][node], ranks[b][node] = parent, d, r
    device = topk_logprobs.device
    parents_t = torch.tensor(parents, dtype=torch.int32, device=device).reshape(bs, n)
    depths_t = torch.tensor(depths, dtype=torch.int32, device=device).reshape(bs, n)
    ranks_t = torch.tensor(ranks, dtype=torch.long, device=device).reshape(bs, n)
    flat = (depths_t.long() - 1).clamp(min=0) * topk + ranks_t
    tokens = topk_ids.long().reshape(bs, depth * topk).gather(1, flat)
    tokens[:, 0] = root_tokens
    first_child, next_sibling = tree_links(parents_t)
    positions = start_positions.long()[:, None] + depths_t
    return TreeBuffers(tokens, parents_t, depths_t, positions, first_child, next_sibling,
                       ancestor_mask(parents_t, depth))


def _verify_result(tokens: torch.Tensor, path: torch.Tensor, length: torch.Tensor, bonus: torch.Tensor) -> VerifyResult:
    width = path.shape[1]
    col = torch.arange(width, device=tokens.device)
    drafts = tokens.gather(1, path[:, 1:].clamp(min=0))
    emitted = torch.cat([torch.where(col[:-1] < length[:, None], drafts, -1), drafts.new_full((len(drafts), 1), -1)],
                        dim=1)
    emitted.scatter_(1, length[:, None], bonus[:, None])
    return VerifyResult(path.int(), length.int(), bonus, emitted)


class _Walk:
    """Batched root-to-leaf walk over first_child/next_sibling lists: one candidate child per row and step."""

    def __init__(self, first_child: torch.Tensor, next_sibling: torch.Tensor, max_depth: int):
        bs, self.n = first_child.shape
        self.max_depth = max_depth
        self.first_child, self.next_sibling = first_child.long(), next_sibling.long()
        device = first_child.device
        self.rows = torch.arange(bs, device=device)
        self.node = torch.zeros(bs, dtype=torch.long, device=device)
        self.length = torch.zeros_like(self.node)
        self.path = torch.full((bs, max_depth + 1), -1, dtype=torch.long, device=device)
        self.path[:, 0] = 0
        self.candidate = self.first_child[:, 0] if max_depth > 0 else torch.full_like(self.node, -1)

    def steps(self) -> range:
        return range(self.n - 1)  # in a tree every child is tried at most once

    def current(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows with a candidate, the candidate or 0)."""
        active = (self.candidate > 0) & (self.candidate < self.n)
        return active, torch.where(active, self.candidate, 0)

    def advance(self, active: torch.Tensor, child: torch.Tensor, accept: torch.Tensor) -> None:
        """Descend into accepted candidates, move rejected ones to their next sibling."""
        self.length = self.length + accept
        slot = self.length[:, None]
        self.path.scatter_(1, slot, torch.where(accept, child, self.path.gather(1, slot)[:, 0])[:, None])
        self.node = torch.where(accept, child, self.node)
        descend = torch.where(self.length < self.max_depth, self.first_child[self.rows, child], -1)
        self.candidate = torch.where(accept, descend, torch.where(active, self.next_sibling[self.rows, child], -1))


def verify_tree_greedy(tokens: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                       target_predict: torch.Tensor, max_depth: int) -> VerifyResult:
    """Walk from the root while a child carries the target's argmax at the current node (first such child)."""
    tokens = tokens.long()
    walk = _Walk(first_child, next_sibling, max_depth)
    for _ in walk.steps():
        active, child = walk.current()
        accept = active & (tokens[walk.rows, child] == target_predict[walk.rows, walk.node])
        walk.advance(active, child, accept)
    return _verify_result(tokens, walk.path, walk.length, target_predict[walk.rows, walk.node].long())


def verify_tree_sampling(tokens: torch.Tensor, first_child: torch.Tensor, next_sibling: torch.Tensor,
                         target_probs: torch.Tensor, coins: torch.Tensor, race: torch.Tensor,
                         max_depth: int) -> VerifyResult:
    """Multi-candidate speculative sampling of deterministic candidates, target_probs [bs, n, V] (rows normalized).

    At each node try the children in order: child c with token t is accepted iff p(t) > 0 and
    coins[c] * mass < p(t), mass = 1 - p(siblings rejected so far) (float32, in trial order); a repeated token
    has p = 0. Without an accepted child the bonus is the race winner over p with the rejected tokens removed
    (over p itself in the float-rounding case where nothing is left).
    """
    tokens = tokens.long()
    bs, n, vocab = target_probs.shape
    walk = _Walk(first_child, next_sibling, max_depth)
    rows = walk.rows
    mass = torch.ones(bs, dtype=torch.float32, device=tokens.device)
    rejected = torch.zeros((bs, n), dtype=torch.bool, device=tokens.device)  # nodes tried and rejected here
    for _ in walk.steps():
        active, child = walk.current()
        token = tokens[rows, child]
        in_vocab = (token >= 0) & (token < vocab)
        prob = target_probs[rows, walk.node, token.clamp(0, vocab - 1)]
        repeated = (rejected & (tokens == token[:, None])).any(dim=1)
        prob = torch.where(active & in_vocab & ~repeated, prob, 0.0)
        accept = active & (prob > 0) & (coins[rows, child] * mass < prob)
        reject = active & ~accept
        mass = torch.where(accept, 1.0, torch.where(reject, mass - prob, mass))
        rejected &= ~accept[:, None]
        rejected[rows, child] |= reject
        walk.advance(active, child, accept)

    prob_row = target_probs[rows, walk.node]
    excluded = torch.zeros_like(prob_row).scatter_add_(1, tokens.clamp(0, vocab - 1),
                                                       (rejected & (tokens >= 0) & (tokens < vocab)).float()) > 0
    score = torch.where(prob_row > 0, prob_row / race, 0.0)
    kept = (prob_row > 0) & ~excluded
    bonus = torch.where(kept.any(dim=1), torch.where(kept, score, -1.0).argmax(dim=1), score.argmax(dim=1))
    return _verify_result(tokens, walk.path, walk.length, bonus)


def tree_verify_inputs(ancestor_mask: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                       req_to_token: torch.Tensor, mask_size: int) -> VerifyInputs:
    """Each request's verify slots req_to_token[r, seq_len + j] (j < n) and the flat custom mask of SGLang's triton
    backend: request b owns n rows of (seq_len_b + n) entries, requests back to back; row i may see every committed
    token and tree node j iff ancestor_mask[b, i, j]. `mask_size` >= sum_b n * (seq_len_b + n) is a host-side bound
    (the planning lengths), so the size is known without reading the device; the tail is 1."""
    bs, width, _ = ancestor_mask.shape
    device = ancestor_mask.device
    seq = seq_lens.long()
    slots = req_to_token[req_pool_indices.long()[:, None], seq[:, None] + torch.arange(width, device=device)].long()
    row_len = seq + width
    sizes = width * row_len
    starts = torch.cumsum(sizes, dim=0) - sizes
    rows = torch.arange(width, device=device)
    # Row i of request b starts at starts[b] + i * row_len[b]; node j's column is seq_len + j.
    index = (starts[:, None, None] + rows[None, :, None] * row_len[:, None, None]
             + seq[:, None, None] + rows[None, None, :])
    mask = torch.ones(mask_size, dtype=torch.bool, device=device)
    mask[index.reshape(-1)] = ancestor_mask.reshape(-1)
    return VerifyInputs(slots, mask)


def commit_tree(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                path: torch.Tensor, accept_len: torch.Tensor, verified_emitted: torch.Tensor,
                num_nodes: int) -> TreeCommit:
    """Permute each request's verify columns req_to_token[r, seq_len : seq_len + n] in place: the accepted path's
    slots first (path order), then the other nodes' (node order); and what the step hands on (`TreeCommit`)."""
    bs, width = path.shape
    device = path.device
    columns = seq_lens.long()[:, None] + torch.arange(num_nodes, device=device)
    rows = req_pool_indices.long()[:, None]
    slots = req_to_token[rows, columns]
    steps = torch.arange(width, device=device).expand(bs, width)
    on_path = steps <= accept_len.long()[:, None]
    # Sort key per node: its step on the accepted path, else n + its index; a spare column takes the scatter of
    # the path's padding.
    keys = torch.arange(num_nodes, 2 * num_nodes + 1, device=device).repeat(bs, 1)
    keys.scatter_(1, torch.where(on_path, path.long(), num_nodes), torch.where(on_path, steps, 2 * num_nodes))
    order = keys[:, :num_nodes].argsort(dim=1)
    req_to_token[rows, columns] = slots.gather(1, order)
    commit_lens = accept_len.to(torch.int32) + 1
    return TreeCommit(commit_lens, seq_lens.long() + commit_lens, verified_emitted.long().clamp(min=0))


def chain_block(bonus: torch.Tensor, seq_lens: torch.Tensor, req_pool_indices: torch.Tensor,
                req_to_token: torch.Tensor, block_size: int, mask_token_id: int) -> ChainBlock:
    """The block [anchor, MASK x (B-1)] of each request at positions seq_len .. seq_len+B-1, and their slots."""
    positions = seq_lens.long()[:, None] + torch.arange(block_size, device=seq_lens.device)
    slots = req_to_token[req_pool_indices.long()[:, None], positions].long()
    block_ids = torch.full_like(positions, mask_token_id)
    block_ids[:, 0] = bonus
    return ChainBlock(block_ids, positions, slots)


def chain_accept_greedy(candidates: torch.Tensor, predicted: torch.Tensor, seq_lens: torch.Tensor) -> ChainStep:
    """Keep drafts while each equals the target's argmax at the row before it (`predicted` [bs, B]); the bonus is
    the argmax at row accept_len."""
    matches = candidates[:, 1:] == predicted[:, :-1]
    accept_len = matches.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    bonus = predicted.gather(1, accept_len[:, None].long()).squeeze(1)
    return chain_step(candidates, accept_len, bonus, seq_lens)


def chain_step(candidates: torch.Tensor, accept_len: torch.Tensor, bonus: torch.Tensor,
               seq_lens: torch.Tensor) -> ChainStep:
    """What the commit needs from an acceptance (greedy or sampled) of candidates [bs, B] = [anchor, drafts]."""
    columns = torch.arange(candidates.shape[1], device=candidates.device)[None, :]
    kept = accept_len.long()[:, None]
    drafts = torch.cat([candidates[:, 1:], torch.zeros_like(candidates[:, :1])], dim=1)
    emitted = torch.where(columns < kept, drafts, torch.where(columns == kept, bonus.long()[:, None], 0))
    commit_lens = accept_len.to(torch.int32) + 1
    return ChainStep(accept_len.to(torch.int32), commit_lens, bonus.long(), seq_lens.long() + commit_lens, emitted)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in float32 with an explicit (already Gemma-shifted) scale, cast back to x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * scale).to(x.dtype)


def neox_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, d] by positions [N] with SGLang's cos/sin cache rows ([cos | sin], neox halves)."""
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    return rotated.to(x.dtype)


def context_kv_norm_rope(kv: torch.Tensor, k_norm_scale: torch.Tensor, eps: float, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> ContextKV:
    """kv [N, L, 2, H, D] (the drafter's one K/V GEMM) -> layer-major keys (normed, rotated) and values."""
    num_tokens, num_layers, _, kv_heads, head_dim = kv.shape
    keys = rms_norm(kv[:, :, 0], k_norm_scale[None, :, None, :], eps)
    keys = keys.reshape(num_tokens, num_layers * kv_heads, head_dim)
    keys = neox_rope(keys, positions, cos_sin_cache)
    keys = keys.view(num_tokens, num_layers, kv_heads, head_dim).transpose(0, 1).contiguous()
    values = kv[:, :, 1].transpose(0, 1).contiguous()
    return ContextKV(keys, values)
