"""Greedy draft tokens: argmax of the target's LM head over the drafter's block states, vocab-parallel aware.

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

    def _draft_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Row 0 of each block is the anchor, already known; the drafts are rows 1..B-1.
        hidden = hidden_states.view(-1, self.block_size, hidden_states.shape[-1])[:, 1:]
        return hidden.reshape(-1, hidden.shape[-1]).to(self.weight.dtype)


def shard_argmax(
    rows: torch.Tensor, weight: torch.Tensor, logit_multiplier: float = 1.0, softcap: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and arg-max of the drafter logits over one vocabulary shard; rows [N, H], weight [V_local, H]."""
    logits = (rows @ weight.T).float()
    if logit_multiplier != 1.0:
        logits = logits * logit_multiplier
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.max(dim=-1)


def select_across_shards(shard_max: torch.Tensor, shard_ids: torch.Tensor) -> torch.Tensor:
    """shard_max, shard_ids [tp, N] in rank order -> the global argmax ids [N] (first maximum wins)."""
    best_rank = shard_max.argmax(dim=0, keepdim=True)
    return shard_ids.gather(0, best_rank).squeeze(0)
