"""Sampling acceptance of a drafted chain, in plain torch, on the GPU and without host syncs (greedy acceptance and
the commit bookkeeping are `dflash_sglang.kernels.chain`'s).

One verify step checks, per request, the chain `candidates = [anchor, d_1, ..., d_{B-1}]`: the anchor is the
token emitted last step, the d_j are the drafter's deterministic guesses. Row j of the target's verify output is
the target's next-token distribution after candidates[: j + 1], so draft d_j is judged by row j - 1. Every rule
returns `accept_len` (how many leading drafts are kept, 0..B-1) and `bonus`, the target's own token at row
`accept_len`: it is emitted after the kept drafts and becomes the anchor of the next block.

Shapes: candidates [bs, B] int64; target rows [bs, B, V]; accept_len [bs] int32; bonus [bs] int64.
"""

from __future__ import annotations

import torch


def sampling_accept(
    candidates: torch.Tensor, probs: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless target-only acceptance of deterministic drafts; `probs` [bs, B, V] are the target's sampling rows.

    Draws the randomness, then applies `sampling_accept_with`.
    """
    bs, block = candidates.shape
    uniforms = torch.rand((bs, block - 1), device=probs.device, generator=generator)
    race = torch.empty((bs, probs.shape[-1]), device=probs.device).exponential_(generator=generator)
    return sampling_accept_with(candidates, probs, uniforms, race)


def sampling_accept_with(
    candidates: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor, race: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep d_j with probability p_{j-1}(d_j) (`uniforms` [bs, B-1] < p); at the first rejection draw the bonus
    from p_{j-1} without d_j, renormalised; if every draft is kept, draw it from p_{B-1}.

    The drafts carry no distribution of their own, so each emitted token is distributed exactly as the target:
    P(d) = p(d) and P(y != d) = (1 - p(d)) * p(y) / (1 - p(d)) = p(y). The bonus is an exponential race
    (argmax of weight / E with E ~ Exp(1), `race` [bs, V]), which samples proportionally to unnormalised
    weights without a host round trip.
    """
    block = candidates.shape[1]
    drafts = candidates[:, 1:]
    draft_probs = probs[:, :-1].gather(2, drafts[:, :, None]).squeeze(2)
    kept = uniforms < draft_probs
    accept_len = kept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)

    row_index = accept_len.long()[:, None, None].expand(-1, 1, probs.shape[-1])
    row = probs.gather(1, row_index).squeeze(1)
    if block == 1:
        # A plain step (adaptive width 1) drafts nothing: the bonus is an ordinary sample from row 0.
        return accept_len, (row / race).argmax(dim=1)
    rejected = accept_len < block - 1
    rejected_token = drafts.gather(1, accept_len.long().clamp(max=block - 2)[:, None])
    residual = row.scatter(1, rejected_token, 0.0)
    weights = torch.where(rejected[:, None], residual, row)
    # A rejected draft had p < 1, so its residual has mass; this only guards float underflow of that mass.
    weights = torch.where(weights.sum(dim=1, keepdim=True) > 0, weights, row)
    bonus = (weights / race).argmax(dim=1)
    return accept_len, bonus


def filtered_probs(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    top_ks: torch.Tensor | None = None,
    top_ps: torch.Tensor | None = None,
    min_ps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target sampling distribution per row [N, V], as SGLang's pytorch sampler defines it.

    Softmax at temperature, then the filters on probability rank: top-k keeps the first k; top-p keeps a token
    while the mass ranked before it is <= top_p; min-p keeps tokens with p >= min_p * max p. Renormalised.
    A None filter is off. Greedy requests arrive as temperature 1, top-k 1, i.e. a one-hot row.
    """
    probs = torch.softmax(logits.float() / temperatures.float().view(-1, 1), dim=-1)
    if top_ks is None and top_ps is None and min_ps is None:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if top_ks is not None:
        ranks = torch.arange(probs.shape[-1], device=probs.device)
        keep &= ranks[None, :] < top_ks.view(-1, 1)
    if top_ps is not None:
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep &= mass_before <= top_ps.float().view(-1, 1)
    if min_ps is not None:
        keep &= sorted_probs >= sorted_probs[:, :1] * min_ps.float().view(-1, 1)
    kept = torch.zeros_like(probs).scatter(1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)
