"""The drafter's context K/V of every verify row, written inside the target's verify CUDA graphs.

A chain step (and a plain width-1 step) gives every verify row's target features to the drafter as context K/V, at
the row's own position and KV slot, committed or not. The rows past a request's commit hold features of rejected
drafts, but their slots lie at or past its new committed length: the next step's block covers them, and the
drafter's forward stores its block K/V there before its attention reads them. The drafter only reads context below
the committed length, where every row was committed. So the write needs nothing from the acceptance and can run
inside the verify forward: SGLang calls each of a model runner's `capture_tail_hooks` at the end of every forward
its decode-graph runner captures, and ours records the write into the target's verify graphs. That takes the
write's host cost (0.55-0.68 ms a step on the H200, whatever the batch: four launches and one pool store per
drafter layer) out of the step.

A tree step writes every node the same way, at the node's verify slot and its position (committed length + its
depth). The commit then permutes the request's slots so that the accepted path's node of depth i sits at position
committed + i (kernels/commit.py): the K/V the drafter finds there is that node's, computed at that position, as a
write after the acceptance would have made it. The other nodes' slots go past the new committed length, where the
next block covers them. A tree's positions are not its lengths plus a row index, and the graph's own positions
buffer may be shifted in place by the forward (Gemma 4), so the worker stages them in a buffer of ours before each
tree verify (`stage_tree_positions`), and the graphs read it.

A plain step that runs as a DECODE forward (adaptive_width.py) writes its one row from inside the DECODE graphs
the same way. An eager forward (graphs off, or a batch above --cuda-graph-max-bs) writes the same rows to the same
slots after it.
"""

from __future__ import annotations

import torch


class VerifyGraphContext:
    """Writes the verify rows' context K/V; as a target capture tail hook, from inside the verify graphs of `widths`
    (and the DECODE graphs of plain steps, when 1 is among them) and, with `tree_width`, of the tree's verify, whose
    positions come from a staging buffer of `tree_rows` rows (the most a tree graph verifies)."""

    def __init__(self, draft_model, draft_runner, widths, tree_width: int | None = None, tree_rows: int = 0,
                 device="cpu"):
        self.draft_model = draft_model
        self.draft_runner = draft_runner  # its KV pool exists once SGLang has sized the pools, after our __init__
        self.widths = frozenset(widths)
        self.tree_width = tree_width
        # Allocated before any graph is captured: the graphs read it at this address.
        self.tree_positions = (torch.zeros(tree_rows, dtype=torch.int64, device=device)
                               if tree_width is not None else None)
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
        tree = mode.is_target_verify() and width == self.tree_width
        if width not in self.widths and not tree:
            return
        features = getattr(out, "hidden_states", None)
        if tree and num_tokens > self.tree_positions.shape[0]:
            features = None  # a graph larger than the staging buffer: its tree steps write after their forward
        self.captured[(mode.is_decode(), width)] = features is not None
        if features is not None:
            # The graph's positions buffer may be shifted in place by the forward (Gemma 4); the lengths are not.
            positions = self.tree_positions[:num_tokens] if tree else row_positions(committed, width)
            self.write(features, positions, forward_batch.out_cache_loc)

    def stage_tree_positions(self, positions: torch.Tensor) -> None:
        """Before a tree verify: its rows' positions [bs, width], where its graph's write reads them."""
        if self.tree_positions is not None and positions.numel() <= self.tree_positions.shape[0]:
            self.tree_positions[: positions.numel()].copy_(positions.reshape(-1), non_blocking=True)

    def written_in_graph(self, width: int, ran_graph: bool, decode: bool = False) -> bool:
        """Whether a forward of `width` (a DECODE one if `decode`, else a verify) that did (or did not) replay a graph
        has already written the context."""
        return ran_graph and self.captured.get((decode, width), False)

    def write(self, features: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        self.draft_model.write_context_kv(features, positions, slots, self.draft_runner.token_to_kv_pool)

    def write_unless_in_graph(self, width: int, ran_graph: bool, features: torch.Tensor, positions: torch.Tensor,
                              slots: torch.Tensor, decode: bool = False) -> None:
        """After a forward of `width` (see `written_in_graph`): the rows' context, unless its graph wrote it."""
        if not self.written_in_graph(width, ran_graph, decode):
            self.write(features, positions.reshape(-1), slots.reshape(-1))


def row_positions(seq_lens: torch.Tensor, width: int) -> torch.Tensor:
    """[bs * width] int64 positions of each request's verify rows: committed length + 0 .. width-1."""
    return (seq_lens.long()[:, None] + torch.arange(width, device=seq_lens.device)).reshape(-1)
