"""Draft tokens from the target's LM head over the drafter's block states, vocab-parallel aware: the argmax (chain)
or the top-k with log-probabilities (tree mode).

The drafter has no head of its own; its logits are the target head's, times the drafter's `output_multiplier`,
then soft-capped (`cap * tanh(x / cap)`), as the reference drafter defines them. Under tensor parallelism each
rank holds a contiguous, ascending slice of the vocabulary: every rank takes its local max, the maxima and their
global ids are all-gathered, and the first rank holding the largest value wins, which is exactly a full-vocab
argmax (torch.argmax returns the first maximum, and lower ranks hold lower ids).
"""

from __future__ import annotations

import torch


class GreedyDraftHead:
    """Block rows 1..B-1 of the drafter's output -> drafted token ids.

    weight: the target head's local rows [rows, H] (padding rows past `num_rows` are skipped);
    vocab_start: global id of local row 0; tp_group: an SGLang GroupCoordinator when the head is
    vocab-parallel across more than one rank, else None.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block_size: int,
        num_rows: int,
        vocab_start: int = 0,
        logit_multiplier: float = 1.0,
        softcap: float | None = None,
        tp_group=None,
    ):
        self.weight = weight
        self.block_size = block_size
        self.num_rows = num_rows
        self.vocab_start = vocab_start
        self.logit_multiplier = logit_multiplier
        self.softcap = softcap
        self.tp_group = tp_group
        self.graph_tokens: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [bs * B, H] -> drafted tokens [bs * (B - 1)] int64."""
        rows = self._draft_rows(hidden_states)
        local_max, local_ids = shard_argmax(rows, self.weight[: self.num_rows], self.logit_multiplier, self.softcap)
        local_ids = local_ids + self.vocab_start
        if self.tp_group is None:
            return local_ids
        world = self.tp_group.world_size
        gathered_max = local_max.new_empty((world * local_max.shape[0],))
        gathered_ids = local_ids.new_empty((world * local_ids.shape[0],))
        self.tp_group.all_gather_into_tensor(gathered_max, local_max)
        self.tp_group.all_gather_into_tensor(gathered_ids, local_ids)
        return select_across_shards(gathered_max.view(world, -1), gathered_ids.view(world, -1))

    def allocate_graph_output(self, max_batch_size: int) -> None:
        """Static output of the CUDA-graph variant: replays write drafts for their padded batch here."""
        self.graph_tokens = torch.empty(
            (max_batch_size * (self.block_size - 1),), dtype=torch.int64, device=self.weight.device
        )

    def capture_hook(self, runner, output, forward_batch, num_tokens: int) -> None:
        """SGLang `capture_tail_hooks` entry: folds the head into the drafter's captured forward."""
        tokens = self(output.hidden_states[:num_tokens])
        self.graph_tokens[: tokens.shape[0]].copy_(tokens)

    def graph_output(self, batch_size: int) -> torch.Tensor:
        """What the last graph replay wrote for its first `batch_size` requests, as `__call__` returns it."""
        return self.graph_tokens[: batch_size * (self.block_size - 1)]

    def _draft_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Row 0 of each block is the anchor, already known; the drafts are rows 1..B-1.
        hidden = hidden_states.view(-1, self.block_size, hidden_states.shape[-1])[:, 1:]
        return hidden.reshape(-1, hidden.shape[-1]).to(self.weight.dtype)


def shard_argmax(
    rows: torch.Tensor, weight: torch.Tensor, logit_multiplier: float = 1.0, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and arg-max of the drafter logits over one vocabulary shard; rows [N, H], weight [V_local, H]."""
    return drafter_logits(rows, weight, logit_multiplier, softcap).max(dim=-1)


def select_across_shards(shard_max: torch.Tensor, shard_ids: torch.Tensor) -> torch.Tensor:
    """shard_max, shard_ids [tp, N] in rank order -> the global argmax ids [N] (first maximum wins)."""
    best_rank = shard_max.argmax(dim=0, keepdim=True)
    return shard_ids.gather(0, best_rank).squeeze(0)


class TopkDraftHead(GreedyDraftHead):
    """Block rows 1..B-1 -> the drafter's top-k tokens per position with their log-probabilities (tree mode).

    Under tensor parallelism each rank takes its shard's top-k and log-sum-exp; the k * tp candidates and the
    shards' normalizers are all-gathered, and the global top-k of the candidates is the full-vocab top-k.
    """

    def __init__(self, *args, topk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.topk = topk
        self.graph_logprobs: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [bs * B, H] -> (log-probs [bs * (B-1), k] float32 descending, token ids [bs * (B-1), k])."""
        rows = self._draft_rows(hidden_states)
        logits = drafter_logits(rows, self.weight[: self.num_rows], self.logit_multiplier, self.softcap)
        values, ids = logits.topk(self.topk, dim=-1)
        normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
        ids = ids + self.vocab_start
        if self.tp_group is not None:
            values, ids, normalizer = self._gather_shards(values, ids, normalizer)
        return values - normalizer, ids

    def _gather_shards(self, values, ids, normalizer):
        world, n = self.tp_group.world_size, values.shape[0]
        gathered = [values.new_empty((world * n, self.topk)), ids.new_empty((world * n, self.topk)),
                    normalizer.new_empty((world * n, 1))]
        for out, local in zip(gathered, (values, ids, normalizer)):
            self.tp_group.all_gather_into_tensor(out, local.contiguous())
        values, ids, normalizer = (t.view(world, n, -1).transpose(0, 1).reshape(n, -1) for t in gathered)
        best, pick = values.topk(self.topk, dim=-1)
        return best, ids.gather(1, pick), torch.logsumexp(normalizer, dim=-1, keepdim=True)

    def allocate_graph_output(self, max_batch_size: int) -> None:
        rows = max_batch_size * (self.block_size - 1)
        device = self.weight.device
        self.graph_logprobs = torch.empty((rows, self.topk), dtype=torch.float32, device=device)
        self.graph_tokens = torch.empty((rows, self.topk), dtype=torch.int64, device=device)

    def capture_hook(self, runner, output, forward_batch, num_tokens: int) -> None:
        logprobs, tokens = self(output.hidden_states[:num_tokens])
        self.graph_logprobs[: logprobs.shape[0]].copy_(logprobs)
        self.graph_tokens[: tokens.shape[0]].copy_(tokens)

    def graph_output(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_size * (self.block_size - 1)
        return self.graph_logprobs[:rows], self.graph_tokens[:rows]


def drafter_logits(rows: torch.Tensor, weight: torch.Tensor, logit_multiplier: float = 1.0,
                   softcap: float | None = None) -> torch.Tensor:
    """Float32 drafter logits over one vocabulary shard; rows [N, H], weight [V_local, H]."""
    logits = (rows @ weight.T).float()
    if logit_multiplier != 1.0:
        logits = logits * logit_multiplier
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
