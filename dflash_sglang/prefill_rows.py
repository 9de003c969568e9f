"""A prefill laid out as verify rows, so that the target's verify CUDA graphs can compute it.

A speculative server's requests finish on different steps, so under load they reach prefill one at a time, and
each such prefill is a scheduler step of its own. SGLang 0.5.16 runs it through its prefill graph, which replays
the layers between attention calls and runs attention eagerly: ~6-9 ms of host for one SmolLM2 prompt on the
H200, as much as three or four of our decode steps (docs/results, 2026-11-30l). A verify forward runs whole in one
graph replay.

The verify forward (TARGET_VERIFY) computes W tokens per row: each row attends to its request's KV cache up to
the row's length and causally within itself. A prompt extended by E tokens after a cached prefix of P is the same
computation split into ceil(E / W) rows of that request, row r holding tokens P + rW .. P + rW + W - 1 at length
P + rW: every layer stores all rows' K/V before any row attends, so row r finds rows 0..r-1 of the same layer in
the cache. The last row is padded past the prompt; pad tokens come after every real one in causal order, so no
real token sees them, and their K/V go to slot 0, SGLang's padding slot.

Host-side layout only (lists in, CPU tensors out); the worker gathers the tokens and slots on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillRows:
    request: torch.Tensor  # [R] int64: the request (index into the batch) each row belongs to
    seq_lens: torch.Tensor  # [R] int64: the row's length, the tokens of its request before it (P + rW)
    token_index: torch.Tensor  # [R, W] int64: each position's token in the batch's extend tokens, -1 for a pad
    last_index: torch.Tensor  # [k] int64: flat (row * W + column) position of each request's last token

    @property
    def num_rows(self) -> int:
        return self.request.shape[0]

    @property
    def width(self) -> int:
        return self.token_index.shape[1]

    def row_ends(self) -> torch.Tensor:
        """[R] the length each row reaches, pads included (P + (r + 1) W): what positions and caches must allow."""
        return self.seq_lens + self.width


def rows_needed(prefix_lens: Sequence[int], extend_lens: Sequence[int], width: int) -> tuple[int, int]:
    """How many verify rows of `width` tokens the extends take, and the furthest length a padded row reaches (what
    positions and caches must allow), from host lists alone."""
    rows = [-(-int(n) // width) for n in extend_lens]
    return sum(rows), max(int(p) + r * width for p, r in zip(prefix_lens, rows))


def prefill_rows(prefix_lens: Sequence[int], extend_lens: Sequence[int], width: int) -> PrefillRows:
    """The rows of a prefill batch whose request i computes extend_lens[i] tokens after prefix_lens[i] cached ones
    (its tokens are the next extend_lens[i] entries of the batch's concatenated extend tokens)."""
    if len(prefix_lens) != len(extend_lens) or width < 1 or any(int(n) < 1 for n in extend_lens):
        raise ValueError(f"need one prefix per extend, extends of at least one token and a width >= 1; got prefixes "
                         f"{list(prefix_lens)}, extends {list(extend_lens)}, width {width}")
    extend = torch.tensor([int(n) for n in extend_lens], dtype=torch.int64)
    prefix = torch.tensor([int(n) for n in prefix_lens], dtype=torch.int64)
    rows = (extend + width - 1) // width
    request = torch.repeat_interleave(torch.arange(len(extend)), rows)
    first_row = torch.cumsum(rows, 0) - rows
    row_in_request = torch.arange(int(rows.sum())) - first_row[request]
    offset = row_in_request[:, None] * width + torch.arange(width)  # token offset within the request's extend
    first_token = torch.cumsum(extend, 0) - extend
    token_index = torch.where(offset < extend[request, None], first_token[request, None] + offset, -1)
    last_index = (first_row + (extend - 1) // width) * width + (extend - 1) % width
    return PrefillRows(request=request, seq_lens=prefix[request] + row_in_request * width, token_index=token_index,
                       last_index=last_index)
