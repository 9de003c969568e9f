"""SGLang plugin entry point: serve `--speculative-algorithm DFLASH` with dflash_sglang's worker.

`register()` runs in every SGLang process that loads plugins (the API server as well as each scheduler), so it
only checks the SGLang version and registers AROUND hooks: one on the worker factory (the worker module is
imported by it, in the scheduler, when SGLang asks for the DFLASH worker class), one that gives each request's
`req_to_token` row room for DFLASH's KV reservation, one that cuts an aborted request's output at max_new_tokens,
two that add our launch flags (flags.py) and one for the verify-mask policy of the target's CUDA graphs in tree
mode (tree_mode.py). DFLASH stays SGLang's own enum member, so every other DFLASH branch in SGLang (target feature
capture, KV budget, verify CUDA graphs, request validation) still applies.
"""

from __future__ import annotations

import logging

from dflash_sglang.sglang import flags, tree_mode
from dflash_sglang.sglang.compat import check_sglang_version
from dflash_sglang.sglang.env import env_flag

logger = logging.getLogger(__name__)

CREATE_WORKER_TARGET = "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker"
# The name as kv_cache_configurator imported it (a `from ... import`), which is where the pools are sized.
ROW_HEADROOM_TARGET = "sglang.srt.mem_cache.kv_cache_configurator.get_req_to_token_extra_context_len"
FINISH_STATE_TARGET = "sglang.srt.managers.schedule_batch.Req.update_finish_state"
DISABLE_ENV = "DFLASH_SGLANG_DISABLE"
SERVING_OURS = "dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker"
SERVING_BUILTIN = "dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2"
_serving_ours = False  # set in the scheduler process once our worker class is handed out


def register() -> None:
    check_sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(CREATE_WORKER_TARGET, create_worker_hook, HookType.AROUND)
    HookRegistry.register(ROW_HEADROOM_TARGET, row_headroom_hook, HookType.AROUND)
    HookRegistry.register(FINISH_STATE_TARGET, finish_state_hook, HookType.AROUND)
    HookRegistry.register(flags.ADD_CLI_ARGS_TARGET, flags.add_cli_args_hook, HookType.AROUND)
    HookRegistry.register(flags.FROM_CLI_ARGS_TARGET, flags.from_cli_args_hook, HookType.AROUND)
    HookRegistry.register(tree_mode.MASK_POLICY_TARGET, tree_mode.mask_policy_hook, HookType.AROUND)


def is_disabled() -> bool:
    return env_flag(DISABLE_ENV)


def create_worker_hook(original, algorithm, server_args):
    """AROUND `SpeculativeAlgorithm.create_worker`: our worker class for DFLASH, SGLang's for everything else."""
    if not algorithm.is_dflash():
        return original(algorithm, server_args)
    if is_disabled():
        _announce(f"{SERVING_BUILTIN} because {DISABLE_ENV}=1")
        return original(algorithm, server_args)
    from dflash_sglang.sglang.worker import DFlashWorker

    _announce(f"{SERVING_OURS} (the dflash_sglang plugin is installed; set {DISABLE_ENV}=1 for the builtin)")
    global _serving_ours
    _serving_ours = True
    return DFlashWorker


def row_headroom_hook(original, server_args) -> int:
    """AROUND SGLang's `req_to_token` row headroom past the context length.

    DFLASH's spec-v2 step reserves KV slots up to committed + 2 x num_draft_tokens for each request
    (`DFlashDraftInputV2.prepare_for_decode`), but SGLang sizes rows for context + 4 + num_draft_tokens. Near the
    context limit the reservation ran past the row into its neighbour's and slots were lost: on the H200 a
    2,038-token prompt at context 2,048 tripped SGLang's idle leak check, which stops the server. With our worker
    the rows hold the whole reservation.
    """
    extra = original(server_args)
    if str(server_args.speculative_algorithm).upper() != "DFLASH" or is_disabled():
        return extra
    return max(extra, 4 + 2 * int(server_args.speculative_num_draft_tokens or 0))


def finish_state_hook(original, req, new_accepted_len: int = 1) -> None:
    """AROUND `Req.update_finish_state`: a request never reports more than max_new_tokens tokens.

    SGLang lets a pending abort (`to_finish`) win over its length check, and then leaves `finished_len` unset, so
    a verify step that appended several tokens past max_new_tokens in the same iteration shows all of them: on the
    H200 soak an aborted request with max_tokens 2 streamed 3 tokens. With our worker serving, the output is cut
    at max_new_tokens whatever finished the request (the tokens up to there are the target's own).
    """
    original(req, new_accepted_len)
    if not _serving_ours or not req.finished() or req.finished_len is not None:
        return
    limit = req.sampling_params.max_new_tokens
    if limit is not None and len(req.output_ids) > limit:
        req.finished_len = limit


def _announce(message: str) -> None:
    # Every TP rank builds a worker; the first rank speaks for all of them.
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        logger.info(message)
