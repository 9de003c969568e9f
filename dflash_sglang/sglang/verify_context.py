"""The drafter's context K/V of a chain step, written inside the target's verify CUDA graphs.

A chain step (and a plain width-1 step) gives every verify row's target features to the drafter as context K/V, at
the row's own position and KV slot, committed or not. The rows past a request's commit hold features of rejected
drafts, but their slots lie at or past its new committed length: the next step's block covers them, and the
drafter's forward stores its block K/V there before its attention reads them. The drafter only reads context below
the committed length, where every row was committed. So the write needs nothing from the acceptance and can run
inside the verify forward: SGLang calls each of a model runner's `capture_tail_hooks` at the end of every forward
its decode-graph runner captures, and ours records the write into the target's verify graphs. That takes the
write's host cost (0.55-0.68 ms a step on the H200, whatever the batch: four launches and one pool store per
drafter layer) out of the step.

A plain step that runs as a DECODE forward (adaptive_width.py) writes its one row from inside the DECODE graphs
the same way. An eager forward (graphs off, or a batch above --cuda-graph-max-bs) writes the same rows to the same
slots after it. Tree steps keep their own write: their committed rows are a path through the tree, known only after
the acceptance, and the commit moves their KV slots.
"""

from __future__ import annotations

import torch


class VerifyGraphContext:
    """Writes the chain's context K/V; as a target capture tail hook, from inside the verify graphs of `widths`
    (and the DECODE graphs of plain steps, when 1 is among them)."""

    def __init__(self, draft_model, draft_runner, widths):
        self.draft_model = draft_model
        self.draft_runner = draft_runner  # its KV pool exists once SGLang has sized the pools, after our __init__
        self.widths = frozenset(widths)
        # (DECODE graph?, width) -> whether those graphs hold the write (as of their last capture)
        self.captured: dict[tuple[bool, int], bool] = {}

    def capture_hook(self, graph_runner, out, forward_batch, num_tokens: int) -> None:
        """SGLang's tail hook: called inside every target decode-graph capture, with the graph's static buffers."""
        mode = forward_batch.forward_mode
        if mode.is_decode():
            # A DECODE batch's lengths count the token it computes.
            width, committed = 1, forward_batch.seq_lens - 1
        elif mode.is_target_verify():
            width, committed = num_tokens // forward_batch.batch_size, forward_batch.seq_lens
        else:
            return
        if width not in self.widths:
            return
        features = getattr(out, "hidden_states", None)
        self.captured[(mode.is_decode(), width)] = features is not None
        if features is not None:
            # The graph's positions buffer may be shifted in place by the forward (Gemma 4); the lengths are not.
            self.write(features, row_positions(committed, width), forward_batch.out_cache_loc)

    def written_in_graph(self, width: int, ran_graph: bool, decode: bool = False) -> bool:
        """Whether a forward of `width` (a DECODE one if `decode`, else a verify) that did (or did not) replay a graph
        has already written the context."""
        return ran_graph and self.captured.get((decode, width), False)

    def write(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.draft_model.write_context_kv(features, positions, slots, self.draft_runner.token_to_kv_pool)


def row_positions(seq_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[bs * width] int64 positions of each request's verify rows: committed length + 0 .. width-1."""
    return (seq_lens.long()[:, None] + torch.arange(width, device=seq_lens.device)).reshape(-1)
