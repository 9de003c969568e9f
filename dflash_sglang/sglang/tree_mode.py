"""Tree drafting and verification (DDTree) inside SGLang's decode step: settings and launch flags (the per-step
tensors come from `dflash_sglang.kernels`: `tree_verify_inputs`, `commit_tree`).

The drafter's one forward gives a distribution at every block position; a best-first tree over their top-k
(`dflash_sglang.kernels.build_draft_tree`) of `budget` nodes is verified by the target in ONE forward of
`budget + 1` tokens (the anchor is the root) under a custom attention mask: node i sees the committed context
and its own ancestors, at position committed_len + depth(i). SGLang sizes everything speculative by
`--speculative-num-draft-tokens` (the verify width: KV reservation, the target's verify CUDA graphs, the
triton backend's mask layout), so tree mode sets it to budget + 1 while the drafter keeps its trained block.

Launch flags (flags.py): --speculative-dflash-tree-budget N (tree mode on), --speculative-dflash-topk K (default
4). They reach the scheduler processes as the environment variables below (which also switch tree mode on for the
offline Engine, together with --speculative-num-draft-tokens N+1).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from dflash_sglang.config import DFlashConfigError
from dflash_sglang.kernels.reference import tree_num_nodes

BUDGET_ENV = "DFLASH_SGLANG_TREE_BUDGET"
TOPK_ENV = "DFLASH_SGLANG_TREE_TOPK"
DEFAULT_TOPK = 4
MAX_TREE_NODES = 256  # the tree-build kernel's per-request capacity, root included
MAX_TOPK = 64
MASK_POLICY_TARGET = "sglang.srt.speculative.dflash_utils.resolve_dflash_verify_mask_policy"
# Backends whose verify attention honours a custom mask inside CUDA graphs with our layout.
TREE_VERIFY_BACKENDS = ("triton",)


@dataclass(frozen=True)
class TreeSettings:
    budget: int  # draft nodes per request
    topk: int  # candidates per block position

    @property
    def verify_width(self) -> int:
        return self.budget + 1


def settings_from_env(environ=os.environ) -> TreeSettings | None:
    """Tree mode's settings, or None for the chain; a malformed value is an error naming its flag."""
    budget, topk = environ.get(BUDGET_ENV, "").strip(), environ.get(TOPK_ENV, "").strip()
    if not budget:
        return None
    errors = []
    values = {}
    for name, flag, raw in (("budget", "--speculative-dflash-tree-budget", budget),
                            ("topk", "--speculative-dflash-topk", topk or str(DEFAULT_TOPK))):
        try:
            values[name] = int(raw)
        except ValueError:
            errors.append(f"{flag} must be an integer, got {raw!r}")
    if errors:
        raise DFlashConfigError(errors)
    return TreeSettings(**values)


def check_tree(settings: TreeSettings, block_size: int, num_draft_tokens: int, attention_backend: str | None) -> list[str]:
    """Every reason the tree cannot be served with this drafter block and these flags."""
    errors = []
    budget, topk, width = settings.budget, settings.topk, settings.verify_width
    if not 1 <= topk <= MAX_TOPK:
        errors.append(f"--speculative-dflash-topk {topk} must be between 1 and {MAX_TOPK}")
    if not 1 <= budget < MAX_TREE_NODES:
        errors.append(f"--speculative-dflash-tree-budget {budget} must be between 1 and {MAX_TREE_NODES - 1}")
    elif 1 <= topk <= MAX_TOPK and tree_num_nodes(block_size - 1, topk, budget) != width:
        most = tree_num_nodes(block_size - 1, topk, MAX_TREE_NODES) - 1
        errors.append(
            f"--speculative-dflash-tree-budget {budget} exceeds the {most} distinct draft nodes a block of "
            f"{block_size} with --speculative-dflash-topk {topk} can hold; lower the budget or raise the top-k"
        )
    if num_draft_tokens != width:
        errors.append(
            f"tree mode verifies budget + 1 = {width} tokens per request, but --speculative-num-draft-tokens is "
            f"{num_draft_tokens}; drop --speculative-num-draft-tokens (the tree budget sets it) or make it {width}"
        )
    if 2 * width < block_size:
        # SGLang reserves 2 x num_draft_tokens KV slots ahead of each request; the draft block must fit in them.
        errors.append(
            f"--speculative-dflash-tree-budget {budget} is too small for the drafter's block of {block_size}: "
            f"use at least {(block_size + 1) // 2 - 1}"
        )
    if attention_backend not in TREE_VERIFY_BACKENDS:
        errors.append(
            f"tree verification needs a target attention backend with custom verify masks "
            f"({', '.join(TREE_VERIFY_BACKENDS)}); "
            f"got --attention-backend {attention_backend}: pass --attention-backend triton, or drop the tree flags"
        )
    return errors


_causal_capture = False  # set while the adaptive width's plain verify graphs are captured


def mask_policy_hook(original, attn_backend):
    """AROUND SGLang's DFLASH verify-mask policy: in tree mode the target's verify CUDA graphs are captured with
    the custom-mask path (the chain is causal and skips it); draft runners never get a mask either way."""
    name, build_custom_mask = original(attn_backend)
    if os.environ.get(BUDGET_ENV, "").strip() and not _causal_capture:
        return name, True
    return name, build_custom_mask


@contextlib.contextmanager
def causal_verify_capture():
    """Verify graphs captured inside take SGLang's own mask policy, tree mode or not: the plain (width 1) verify
    of the adaptive width is causal."""
    global _causal_capture
    saved, _causal_capture = _causal_capture, True
    try:
        yield
    finally:
        _causal_capture = saved
