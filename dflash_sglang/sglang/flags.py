"""Our launch flags, added to SGLang's own parser (AROUND hooks on ServerArgs):

  --speculative-dflash-tree-budget N   tree mode: a best-first tree of N draft nodes per request (tree_mode.py)
  --speculative-dflash-topk K          tree mode: candidates per block position (default 4)
  --speculative-dflash-adaptive        each step speculates or decodes plainly, whichever is faster at the running
                                       batch size (adaptive_width.py)
  --[no-]speculative-dflash-verify-splitkv
                                       verifies attend through our split-KV verify kernel (verify_attention.py);
                                       by default wherever the target's attention backend is triton
  --speculative-dflash-draft-head-fp8  drafts through an FP8 copy of the target's head (draft_head.py)
  --[no-]speculative-dflash-verify-prefill
                                       prefills run as verify rows through the target's verify graphs
                                       (verify_prefill.py); by default wherever the server can, on one GPU

SGLang spawns its scheduler processes from the parsed ServerArgs, which has no field for them, so they travel as
environment variables the children inherit (set here, before SGLang resolves its speculative arguments).
"""

from __future__ import annotations

import argparse
import os

from dflash_sglang.config import DFlashConfigError
from dflash_sglang.sglang import adaptive_width, draft_head, tree_mode, verify_attention, verify_prefill

ADD_CLI_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS_TARGET = "sglang.srt.server_args.ServerArgs.from_cli_args"


def add_cli_args_hook(original, parser: argparse.ArgumentParser):
    """AROUND `ServerArgs.add_cli_args`: SGLang's flags, then ours."""
    original(parser)
    group = parser.add_argument_group("dflash_sglang (DFLASH tree drafting, adaptive width, split-KV verify, "
                                       "FP8 draft head, verify-graph prefill)")
    group.add_argument("--speculative-dflash-tree-budget", type=int, default=None,
                       help="DFLASH: verify a best-first tree of this many draft nodes per request (tree mode); "
                            "sets --speculative-num-draft-tokens to budget + 1")
    group.add_argument("--speculative-dflash-topk", type=int, default=None,
                       help=f"DFLASH tree mode: candidates per block position (default {tree_mode.DEFAULT_TOPK})")
    group.add_argument("--speculative-dflash-adaptive", action="store_true", default=False,
                       help="DFLASH: per decode step, speculate (in tree mode: the tree or a chain step) or verify "
                            "the last token alone (a plain decoding step), whichever has been faster at the running "
                            "batch size")
    group.add_argument(verify_attention.FLAG, action=argparse.BooleanOptionalAction, default=None,
                       help="DFLASH: the target's verifies (chain or tree) attend through dflash_sglang's split-KV "
                            "verify kernel (flash-decoding over the context) instead of SGLang's prefill kernel. "
                            "Default: on when the target's attention backend is triton, off otherwise; the flag "
                            "insists (an error on another backend), --no-... keeps SGLang's kernel")
    group.add_argument(draft_head.FP8_HEAD_FLAG, action="store_true", default=False,
                       help="DFLASH: the drafter's logits come from an FP8 copy of the target's LM head (one scale "
                            "per vocab row): half the bytes each draft reads, at the head's size in extra memory; "
                            "drafts only, the target verifies in its own precision; needs an FP8 GPU (sm89+)")
    group.add_argument(verify_prefill.FLAG, action=argparse.BooleanOptionalAction, default=None,
                       help="DFLASH: prefills run as rows of the verify width through the target's verify CUDA graphs "
                            "(one replay, instead of SGLang's prefill graph with its attention run eagerly), where "
                            "the server and the batch allow it: chain servers, and tree servers with "
                            "--speculative-dflash-adaptive. Default: on wherever the server can, without tensor "
                            "parallelism; the flag also turns it on with it, --no-... keeps SGLang's prefill")


def from_cli_args_hook(original, cls, args: argparse.Namespace):
    """AROUND `ServerArgs.from_cli_args`: our flags become environment variables and the tree's verify width."""
    budget = getattr(args, "speculative_dflash_tree_budget", None)
    topk = getattr(args, "speculative_dflash_topk", None)
    if topk is not None and budget is None:
        raise DFlashConfigError(["--speculative-dflash-topk needs --speculative-dflash-tree-budget (tree mode)"])
    if budget is not None:
        os.environ[tree_mode.BUDGET_ENV] = str(budget)
        os.environ[tree_mode.TOPK_ENV] = str(topk if topk is not None else tree_mode.DEFAULT_TOPK)
        if args.speculative_num_draft_tokens is None:
            args.speculative_num_draft_tokens = budget + 1
    if getattr(args, "speculative_dflash_adaptive", False):
        os.environ[adaptive_width.ADAPTIVE_ENV] = "1"
    splitkv = getattr(args, "speculative_dflash_verify_splitkv", None)
    if splitkv is not None:
        os.environ[verify_attention.SPLITKV_ENV] = "1" if splitkv else "0"
    if getattr(args, "speculative_dflash_draft_head_fp8", False):
        os.environ[draft_head.FP8_HEAD_ENV] = "1"
    verify_rows = getattr(args, "speculative_dflash_verify_prefill", None)
    if verify_rows is not None:
        os.environ[verify_prefill.ENV] = "1" if verify_rows else "0"
    return original(cls, args)
