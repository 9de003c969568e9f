"""Acceptance references: which draft nodes the target accepts, and the bonus token it emits after them.

All functions return `(path, accept_len, bonus)`: `path` [bs, D+1] node indices of the accepted root path
(root first, padded with -1), `accept_len` [bs] accepted non-root nodes, `bonus` [bs] the target's token after
the last accepted node. Greedy is exact match against the target argmax. Sampling preserves the target
distribution exactly:
- chain with sampled drafts: rejection sampling against the draft distribution q (accept d with probability
  min(1, p(d)/q(d)), else sample from normalize(max(p - q, 0)));
- tree (deterministic top-k candidates): multi-candidate speculative sampling — try the children in order,
  accept child c with probability p(c) under the current residual, else zero p(c), renormalize, try the next;
  if none is accepted the bonus is drawn from the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dflash_sglang.tree import DraftTree


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (keeping at least one token), then softmax; float32 in, out."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _finish(paths: list[list[int]], bonus: list[int], depth: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    padded = torch.full((len(paths), depth + 1), -1, dtype=torch.long)
    for b, p in enumerate(paths):
        padded[b, : len(p)] = torch.tensor(p)
    accept = torch.tensor([len(p) - 1 for p in paths], dtype=torch.long)
    return padded.to(device), accept.to(device), torch.tensor(bonus, dtype=torch.long, device=device)


def greedy_verify(tree: DraftTree, target_tokens: torch.Tensor):
    """Walk from the root while some child carries the target's argmax at the current node."""
    tokens, preds = tree.tokens.tolist(), target_tokens.tolist()
    paths, bonus = [], []
    for b in range(tree.tokens.shape[0]):
        kids = tree.children(b)
        node, path = 0, [0]
        while True:
            nxt = next((c for c in kids[node] if tokens[b][c] == preds[b][node]), None)
            if nxt is None:
                break
            node = nxt
            path.append(node)
        paths.append(path)
        bonus.append(preds[b][node])
    return _finish(paths, bonus, int(tree.depths.max()), tree.tokens.device)


def sampling_verify_tree(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator | None):
    """Multi-candidate speculative sampling of deterministic candidates; target_probs [bs, n, V]."""
    tokens = tree.tokens.tolist()
    paths, bonus = [], []
    for b in range(tree.tokens.shape[0]):
        kids = tree.children(b)
        node, path = 0, [0]
        while True:
            residual = target_probs[b, node].clone()
            accepted = None
            for child in kids[node]:
                tok = tokens[b][child]
                mass = residual.sum()
                if _uniform(generator) * mass < residual[tok]:
                    accepted = child
                    break
                residual[tok] = 0.0
            if accepted is None:
                bonus.append(int(sample(residual / residual.sum(), generator)))
                break
            node = accepted
            path.append(node)
        paths.append(path)
    return _finish(paths, bonus, int(tree.depths.max()), tree.tokens.device)


def sampling_verify_chain(tree: DraftTree, draft_probs: torch.Tensor, target_probs: torch.Tensor,
                          generator: torch.Generator | None):
    """Rejection sampling of a chain drafted from q: draft_probs [bs, D, V] (q of node i+1 at index i)."""
    tokens = tree.tokens.tolist()
    depth = tree.tokens.shape[1] - 1
    paths, bonus = [], []
    for b in range(tree.tokens.shape[0]):
        path = [0]
        emitted = None
        for i in range(1, depth + 1):
            p, q = target_probs[b, i - 1], draft_probs[b, i - 1]
            tok = tokens[b][i]
            if _uniform(generator) * q[tok] < p[tok]:
                path.append(i)
                continue
            residual = (p - q).clamp(min=0)
            emitted = int(sample(residual / residual.sum(), generator)) if residual.sum() > 0 else int(sample(p, generator))
            break
        if emitted is None:
            emitted = int(sample(target_probs[b, depth], generator))
        paths.append(path)
        bonus.append(emitted)
    return _finish(paths, bonus, depth, tree.tokens.device)
