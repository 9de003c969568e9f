"""The DFLASH speculative worker for SGLang 0.5.16 (spec-v2 contract: overlap scheduling, FutureMap relay).

Per decode step, per request with committed length n and anchor a (the token emitted last step):
  1. block [a, MASK x (B-1)] at positions n..n+B-1, slots req_to_token[req, n : n+B] (reserved ahead by
     DraftState.prepare_for_decode, draft_state.py);
  2. the drafter runs over it (TARGET_VERIFY on its own runner: attends to the committed context K/V in the
     draft pool and bidirectionally to the block), drafts = argmax of the target head on block rows 1..B-1;
  3. the target verifies [a, d_1, ..., d_{B-1}] causally and, inside its CUDA graph, writes every row's features
     as draft context K/V at the row's slot (verify_context.py: rows past the commit are rewritten before the
     drafter reads them);
  4. chain acceptance on the GPU -> accept_len, bonus (greedy, or lossless sampling);
  5. commit: a and the kept drafts (accept_len + 1 tokens) enter both KV caches; the bonus becomes the next anchor.
Nothing in the step reads a device value on the host. Prefill runs the target with feature capture and
writes draft context K/V for every prompt token at once (radix-cache hits then find it already there).

SGLang's data carriers are reused where the scheduler and backends dispatch on them: DFlashDraftInputV2 (draft
state across steps: KV reservation, batch filter/merge, FutureMap relay; ours is its subclass DraftState, whose KV
reservation allocates in chunks) and DFlashVerifyInput (the spec_info of both TARGET_VERIFY forwards).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from copy import deepcopy

import torch
from sglang.srt.configs.hybrid_arch import mambaish_config
from sglang.srt.distributed import get_tp_group
from sglang.srt.layers.logits_processor import LogitsProcessorOutput
from sglang.srt.layers.sampler import apply_custom_logit_processor
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.tp_worker import TpModelWorker
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.runtime_context import get_context, get_server_args
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

from dflash_sglang.adaptive import PLAIN_WIDTH, WidthController
from dflash_sglang.config import (
    SLIDING_ATTENTION,
    DFlashConfig,
    DFlashConfigError,
    TargetInfo,
    default_softcap,
    load_drafter_config,
    validate_pair,
)
from dflash_sglang.kernels import (
    ChainBlock,
    ChainStep,
    VerifyResult,
    build_draft_tree,
    chain_accept_greedy,
    chain_block,
    chain_step,
    commit_tree,
    draw_verify_randoms,
    tree_verify_inputs,
    verify_tree_greedy,
    verify_tree_sampling,
)
from dflash_sglang.prefill_rows import prefill_rows, rows_needed
from dflash_sglang.sglang import verify_prefill
from dflash_sglang.sglang.accept import filtered_probs, sampling_accept
from dflash_sglang.sglang.adaptive_width import (
    VerifyResources,
    adaptive_from_env,
    build_plain_resources,
    build_verify_resources,
    candidate_widths,
    check_adaptive,
    widths_from_env,
)
from dflash_sglang.sglang.draft_head import (
    Fp8HeadWeight,
    GreedyDraftHead,
    TopkDraftHead,
    check_fp8_head,
    fp8_head_from_env,
)
from dflash_sglang.sglang.draft_model import use_as_dflash_draft_model
from dflash_sglang.sglang.draft_state import DraftState
from dflash_sglang.sglang.tree_mode import TreeSettings, check_tree, settings_from_env
from dflash_sglang.sglang.step_timing import NoStepTimer, timer_from_env
from dflash_sglang.sglang.verify_attention import (
    check_splitkv,
    is_triton_backend,
    resolve_splitkv,
    splitkv_from_env,
    use_splitkv_verify,
)
from dflash_sglang.sglang.verify_context import VerifyGraphContext, row_positions

logger = logging.getLogger(__name__)

# Verify rows filtered per chunk in sampling verification (each row sorts the whole vocabulary).
SAMPLING_ROWS_PER_CHUNK = 128
# Seconds between the adaptive width's summaries in the server log (rates and steps per batch-size group).
ADAPTIVE_SUMMARY_SECONDS = 30.0
# Profiler ranges around each step (SGLang's /start_profile traces; scripts/device/profile_step.py reads them).
DECODE_RANGE = "dflash_sglang.decode"


class DFlashWorker(BaseSpecWorker):
    step_timer = NoStepTimer()  # DFLASH_SGLANG_STEP_TIMING=1 gives rank 0 a StepTimer (step_timing.py)
    width_controller: WidthController | None = None  # --speculative-dflash-adaptive
    splitkv = False  # the split-KV verify, decided in init_attention_backends (verify_attention.py)
    # --[no-]speculative-dflash-verify-prefill (verify_prefill.py): True or False as asked, None by default; then the
    # verify width prefills run at and the most rows a graph holds (init_cuda_graphs; None: SGLang's prefill for every
    # batch).
    verify_prefill_setting: bool | None = None
    prefill_width: int | None = None
    prefill_max_rows = 0
    _last_width_summary = 0.0

    def __init__(self, server_args, gpu_id: int, ps, nccl_port: int, target_worker: TpModelWorker):
        self.server_args = server_args
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = target_worker.device
        self.tree = settings_from_env()
        adaptive = adaptive_from_env()
        self.splitkv_setting = splitkv_from_env()
        self.verify_prefill_setting = verify_prefill.setting_from_env()
        fp8_head = fp8_head_from_env()
        # Everything that can be wrong with the pair is reported here, before the draft runner allocates.
        self.drafter_config, self.target_info = check_startup(server_args, self.model_runner, self.tree, adaptive,
                                                              self.splitkv_setting is True, fp8_head)
        # The drafter's block; in tree mode the target verifies tree.verify_width tokens instead.
        self.block_size = self.drafter_config.block_size if self.tree else int(server_args.speculative_num_draft_tokens)
        widths = widths_from_env(self.verify_width, self.chain_width) if adaptive else None

        use_as_dflash_draft_model()
        self._draft_worker = DraftWorkerHandle(
            build_draft_worker(server_args, gpu_id, ps, nccl_port, self.model_runner, self.block_size)
        )
        self.draft_runner = self._draft_worker.model_runner
        self.draft_model = self.draft_runner.model

        target_model = self.model_runner.model
        self.draft_model.use_target_embedding(target_model.get_input_embeddings())
        self.draft_head = make_draft_head(
            target_model.lm_head, self.drafter_config, self.target_info, self.block_size, self.tree, fp8=fp8_head
        )
        if self.tree:
            logger.info(
                "dflash_sglang: tree mode, %d draft nodes (top-%d per position) verified in one pass of %d tokens",
                self.tree.budget, self.tree.topk, self.tree.verify_width,
            )
        self.draft_block_spec = draft_block_spec(self.block_size, self.device)
        # Registered before SGLang captures the target's verify graphs (Scheduler.init_all_cuda_graphs, after this
        # __init__); every step writes its context K/V inside them.
        self.verify_context = verify_graph_context(self.draft_model, self.draft_runner, self.block_size, self.tree,
                                                   max_graph_batch(server_args), self.device)
        self.model_runner.capture_tail_hooks.append(self.verify_context.capture_hook)
        self.step_timer = timer_from_env(get_tp_group().rank_in_group)
        # --speculative-dflash-adaptive: the width controller and both widths' verify resources (init_cuda_graphs,
        # once the target's own are built).
        if widths is not None:
            self.width_controller = WidthController(widths)
        self.verify_resources: dict[int, VerifyResources] = {}
        self.active_width = self.verify_width

    @property
    def verify_width(self) -> int:
        """Tokens per request in a speculative step's target verify."""
        return self.tree.verify_width if self.tree else self.block_size

    @property
    def chain_width(self) -> int | None:
        """In tree mode, the width of a chain step over the same drafted block (the adaptive width's middle
        candidate); None for a chain server, whose speculative width it already is."""
        return self.block_size if self.tree else None

    def __getattr__(self, name):
        # The scheduler treats this worker as its model worker; what we do not define is the target's.
        if name == "_target_worker":
            raise AttributeError(name)
        return getattr(self._target_worker, name)

    @property
    def spec_v2_attn_backends(self) -> tuple:
        return (self.model_runner.attn_backend, self.draft_runner.attn_backend)

    def init_attention_backends(self) -> None:
        super().init_attention_backends()
        # SGLang builds the runners' backends after every worker's __init__ (the target's first, then ours via this
        # method) and captures the graphs after that: here both backends exist and nothing is captured yet.
        self.splitkv = resolve_splitkv(self.splitkv_setting, self.model_runner.attn_backend)
        if self.splitkv:
            use_splitkv_verify(self.model_runner.attn_backend)
            if is_triton_backend(self.draft_runner.attn_backend):
                use_splitkv_verify(self.draft_runner.attn_backend)
            logger.info("dflash_sglang: verifies attend through our split-KV verify kernel (and the drafter's, on a "
                        "triton draft backend)")
        else:
            logger.info("dflash_sglang: verifies attend through %s's own kernels",
                        type(self.model_runner.attn_backend).__name__)

    def init_cuda_graphs(self) -> None:
        graph_batch = max_graph_batch(self.server_args)
        if graph_batch > 0:
            # The draft head joins the drafter's captured forward (capture_tail_hooks run inside capture).
            self.draft_head.allocate_graph_output(graph_batch)
            self.draft_runner.capture_tail_hooks.append(self.draft_head.capture_hook)
        self._draft_worker.init_cuda_graphs()
        if self.width_controller is not None:
            server_args_objects = (self.model_runner.server_args, get_server_args())
            self.verify_resources = {self.verify_width: VerifyResources.current(self.model_runner, self.verify_width)}
            if self.chain_width in self.width_controller.widths and self.chain_width != self.verify_width:
                self.verify_resources[self.chain_width] = build_verify_resources(
                    self.model_runner, self.chain_width, server_args_objects, self.splitkv)
            if PLAIN_WIDTH in self.width_controller.widths:
                self.verify_resources[PLAIN_WIDTH] = build_plain_resources(self.model_runner, server_args_objects,
                                                                           self.splitkv)
            plain = self.verify_resources.get(PLAIN_WIDTH)
            kinds = {self.chain_width: "a chain step", self.verify_width: "the tree" if self.tree else "a chain step",
                     PLAIN_WIDTH: "a plain decoding step" + (", a DECODE forward" if plain and plain.decode else "")}
            logger.info("dflash_sglang: adaptive width on: each step verifies one of %s tokens per request (%s), "
                        "whichever has been faster at the running batch size", list(self.width_controller.widths),
                        "; ".join(f"{w}: {kinds[w]}" for w in self.width_controller.widths))
        if self.verify_prefill_setting is not False:
            self.enable_verify_prefill(graph_batch)

    def enable_verify_prefill(self, max_graph_batch: int) -> None:
        """Prefill through the verify graphs of a causal width, where this server has them (verify_prefill.py)."""
        if not self.tree:
            width = self.block_size
        else:  # its chain steps' graphs, built only with the adaptive width
            width = self.chain_width if self.chain_width in self.verify_resources else None
        reason = verify_prefill.server_reason(self.model_runner, self.server_args)
        if reason is None and self.verify_prefill_setting is None:
            reason = verify_prefill.default_reason(self.server_args)
        if reason is None and max_graph_batch == 0:
            reason = "CUDA graphs off"
        if reason is None and width is None:
            reason = "a tree server verifies under its tree mask only (add --speculative-dflash-adaptive)"
        if reason is not None:
            # A warning when the flag asked for it; by default the server just says which prefill it runs.
            log = logger.warning if self.verify_prefill_setting else logger.info
            log("dflash_sglang: prefills run SGLang's prefill here, not the verify graphs (%s): %s",
                verify_prefill.FLAG, reason)
            return
        self.prefill_width, self.prefill_max_rows = width, max_graph_batch
        logger.info("dflash_sglang: prefills run as rows of %d tokens through the target's verify graphs (up to %d "
                    "rows a batch; others run SGLang's prefill)", width, max_graph_batch)

    def on_verify_complete_cpu(self, num_correct_drafts_per_req: list[int], batch_size: int = 0) -> None:
        """SGLang's scheduler hands over each decode step's acceptance once it is on the host anyway."""
        if self.width_controller is None:
            return
        self.width_controller.observe([n + 1 for n in num_correct_drafts_per_req], batch_size)
        now = time.monotonic()
        if now - self._last_width_summary >= ADAPTIVE_SUMMARY_SECONDS:
            self._last_width_summary = now
            logger.info("dflash_sglang: adaptive width, per batch size:\n%s", self.width_controller.summary())

    def use_width(self, width: int) -> None:
        """Point the target's runner at the verify resources of `width` (the adaptive width's switch)."""
        if width != self.active_width:
            self.verify_resources[width].apply(self.model_runner)
            self.active_width = width

    def forward_batch_generation(self, batch: ScheduleBatch, on_publish=None) -> GenerationBatchResult:
        if batch.forward_mode.is_extend():
            return self.prefill(batch, on_publish)
        if batch.forward_mode.is_idle():
            return self.idle(on_publish)
        if self.width_controller is not None:
            self.use_width(self.width_controller.choose(batch.seq_lens.shape[0]))
            if self.active_width != self.verify_width:  # a plain step, or a tree server's chain step
                return self.decode(batch, on_publish, self.active_width)
        if self.tree:
            return self.decode_tree(batch, on_publish)
        return self.decode(batch, on_publish)

    def prefill(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        if self.width_controller is not None:
            self.width_controller.interrupt()  # the decode steps around it do not time a step alone
        if self.takes_verify_prefill(batch):
            result = self.prefill_in_verify_rows(batch)
        else:
            result = self.target_worker.forward_batch_generation(batch, capture_hidden_mode=CaptureHiddenMode.FULL)
            features = result.logits_output.hidden_states
            positions = extend_positions(batch.prefix_lens, batch.extend_lens, self.device)
            self.draft_model.write_context_kv(features, positions, batch.out_cache_loc,
                                              self.draft_runner.token_to_kv_pool)
            result.logits_output.hidden_states = None  # features stay on the GPU, out of the result's D2H copy
        result.new_seq_lens = batch.seq_lens
        if on_publish is not None:
            on_publish(batch.seq_lens)
        result.next_draft_input = next_draft_state(result.next_token_ids, batch.seq_lens)
        return result

    def takes_verify_prefill(self, batch: ScheduleBatch) -> bool:
        """Whether this prefill batch runs as verify rows (verify_prefill.py); host fields only."""
        width = self.prefill_width
        if width is None or not isinstance(batch.extend_lens, list) or not isinstance(batch.prefix_lens, list):
            return False
        rows, row_end = rows_needed(batch.prefix_lens, batch.extend_lens, width)
        reason = verify_prefill.batch_reason(batch, rows, self.prefill_max_rows, row_end,
                                             self.model_runner.model_config.context_len)
        if reason is not None:
            logger.debug("dflash_sglang: a prefill runs SGLang's prefill: %s", reason)
        return reason is None

    def prefill_in_verify_rows(self, batch: ScheduleBatch) -> GenerationBatchResult:
        """The prompt tokens through the target's verify graphs, as rows of the prefill width
        (dflash_sglang.prefill_rows): the graphs write the drafter's context of every row; SGLang's sampler draws
        each request's first token from its last prompt token's logits."""
        width = self.prefill_width
        if self.width_controller is not None:
            self.use_width(width)
        rows = prefill_rows(batch.prefix_lens, batch.extend_lens, width)
        index = rows.token_index.to(self.device, non_blocking=True)
        request = rows.request.to(self.device, non_blocking=True)
        seq_lens = rows.seq_lens.to(self.device, non_blocking=True)
        valid, index = index >= 0, index.clamp(min=0)
        tokens = torch.where(valid, batch.input_ids[index], 0)
        slots = torch.where(valid, batch.out_cache_loc[index], 0)  # pads store into SGLang's padding slot
        positions = row_positions(seq_lens, width)
        row_ends = rows.row_ends()
        verify = self.verify(batch, tokens, positions, slots, (row_ends, int(row_ends.sum())), seq_lens=seq_lens,
                             req_pool_indices=batch.req_pool_indices[request], orig_seq_lens=seq_lens)
        logits = verify.logits_output
        self.verify_context.write_unless_in_graph(width, verify.can_run_cuda_graph, logits.hidden_states, positions,
                                                  slots)
        first = LogitsProcessorOutput(
            next_token_logits=logits.next_token_logits[rows.last_index.to(self.device, non_blocking=True)])
        sampling_batch = ForwardBatch.init_new(batch, self.model_runner, capture_hidden_mode=CaptureHiddenMode.NULL,
                                               return_hidden_states_before_norm=False)
        first_tokens = self.model_runner.sample(first, sampling_batch)
        return GenerationBatchResult(logits_output=first, next_token_ids=first_tokens,
                                     can_run_cuda_graph=verify.can_run_cuda_graph)

    def idle(self, on_publish) -> GenerationBatchResult:
        empty = torch.empty((0,), dtype=torch.int64, device=self.device)
        state = next_draft_state(empty, empty)
        if on_publish is not None:
            on_publish(state.new_seq_lens)
        return GenerationBatchResult(
            next_token_ids=empty,
            accept_lens=torch.empty((0,), dtype=torch.int32, device=self.device),
            next_draft_input=state,
            speculative_num_draft_tokens=self.block_size,
            new_seq_lens=state.new_seq_lens,
        )

    @torch.profiler.record_function(DECODE_RANGE)
    def decode(self, batch: ScheduleBatch, on_publish, width: int | None = None) -> GenerationBatchResult:
        """One chain step of `width` tokens per request (default: the drafter's block); width 1 is a plain
        decoding step, the anchor alone through the target with no draft (the adaptive width's choice where
        drafting does not pay; a DECODE forward when its resources are DECODE ones, else a one-token verify): its
        features still become draft context, so drafting can resume at any step. A tree server runs chain steps
        too when its adaptive width chooses them: the drafts are the top-1 of the tree's per-position top-k."""
        width = width or self.block_size
        state: DFlashDraftInputV2 = batch.spec_info
        step = self.step_timer.begin(batch.seq_lens.shape[0])
        # In overlap mode the committed lengths were published from the previous step's stream.
        batch.seq_lens.record_stream(torch.get_device_module(self.device).current_stream())
        seq_lens = batch.seq_lens
        block = self.block(batch, state, width)
        # Bounds the lengths whatever the last step committed (at most a block, also after a tree step).
        plan_lens = planning_seq_lens(batch, state, self.block_size)

        candidates = block.block_ids
        if width > 1:
            drafts = self.draft(batch, block, plan_lens)
            if self.tree:
                drafts = drafts[1][:, 0]  # the top-k are in descending order: the first is the argmax
            candidates = torch.cat([block.block_ids[:, :1], drafts.view(seq_lens.shape[0], -1)], dim=1)
        step.mark()
        resources = self.verify_resources.get(width)
        decode = resources is not None and resources.decode
        if decode:
            verify = self.plain_forward(batch, block, plan_lens)
        else:
            verify = self.verify(batch, candidates, block.positions, block.slots, plan_lens)
        self.verify_context.write_unless_in_graph(width, verify.can_run_cuda_graph, verify.logits_output.hidden_states,
                                                  block.positions, block.slots, decode)
        verify.logits_output.hidden_states = None
        step.mark()

        accepted = self.accept(candidates, verify.logits_output.next_token_logits, batch.sampling_info, seq_lens)
        if on_publish is not None:
            on_publish(accepted.new_seq_lens)

        result = step_result(verify.logits_output, accepted.emitted, accepted.commit_lens, accepted.bonus,
                             accepted.new_seq_lens, verify.can_run_cuda_graph, width)
        self.step_timer.end(step)
        return result

    @torch.profiler.record_function(DECODE_RANGE)
    def decode_tree(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        """One tree step: draft the block, build the best-first tree from its top-k, verify every node in one
        target pass (custom mask, positions by depth; the verify graph also writes every node's drafter context at
        its slot, verify_context.py), accept on the GPU, and commit the accepted path by reordering its KV slots,
        which puts its nodes' context at the committed positions. No host sync; between the drafter's and the
        target's graphs, one launch each for the tree, the verify's slots and mask, the staging of its positions,
        the acceptance and the commit (our kernels, or their references)."""
        state: DFlashDraftInputV2 = batch.spec_info
        step = self.step_timer.begin(batch.seq_lens.shape[0])
        batch.seq_lens.record_stream(torch.get_device_module(self.device).current_stream())
        seq_lens = batch.seq_lens
        req_to_token = self.model_runner.req_to_token_pool.req_to_token
        draft_block = self.block(batch, state)
        bs, block, width = draft_block.positions.shape[0], self.block_size, self.tree.verify_width

        anchors = draft_block.block_ids[:, 0]
        logprobs, tokens = self.draft(batch, draft_block, planning_seq_lens(batch, state, block))
        tree = build_draft_tree(anchors, logprobs.view(bs, block - 1, -1), tokens.view(bs, block - 1, -1),
                                seq_lens, self.tree.budget)
        step.mark()
        # Host bounds of the committed lengths (the host copy may trail the device by one step's commit, at
        # most B tokens, whatever the verify width), and of the mask: W rows of (length + W) per request.
        verify_plan = planning_seq_lens(batch, state, max(block, width))
        inputs = tree_verify_inputs(tree.ancestor_mask, seq_lens, batch.req_pool_indices, req_to_token,
                                    width * (verify_plan[1] + bs * width))
        self.verify_context.stage_tree_positions(tree.positions)
        verify = self.verify(batch, tree.tokens, tree.positions, inputs.slots, verify_plan, custom_mask=inputs.mask)
        self.verify_context.write_unless_in_graph(width, verify.can_run_cuda_graph, verify.logits_output.hidden_states,
                                                  tree.positions, inputs.slots)
        step.mark()

        accepted = self.accept_tree(tree, verify.logits_output.next_token_logits, batch.sampling_info)
        committed = commit_tree(req_to_token, batch.req_pool_indices, seq_lens, accepted.path, accepted.accept_len,
                                accepted.emitted, width)
        if on_publish is not None:
            on_publish(committed.new_seq_lens)

        logits_output = verify.logits_output
        logits_output.hidden_states = None
        if batch.return_logprob:
            # SGLang reads row j of a request (stride B) as the distribution of its j-th emitted token: the
            # rows of the accepted path's nodes, in path order.
            path_rows = accepted.path.long().clamp(min=0) + (torch.arange(bs, device=self.device) * width)[:, None]
            logits_output.next_token_logits = logits_output.next_token_logits[path_rows.reshape(-1)]
        result = step_result(logits_output, committed.emitted, committed.commit_lens, accepted.bonus,
                             committed.new_seq_lens, verify.can_run_cuda_graph, block)
        self.step_timer.end(step)
        return result

    def block(self, batch: ScheduleBatch, state: DFlashDraftInputV2, width: int | None = None) -> ChainBlock:
        """The draft block [anchor, MASK x (B-1)] of every request at its next B positions (B: `width`, default
        the drafter's block), and their KV slots."""
        return chain_block(state.bonus_tokens.view(-1), batch.seq_lens, batch.req_pool_indices,
                           self.model_runner.req_to_token_pool.req_to_token, width or self.block_size,
                           self.drafter_config.mask_token_id)

    def draft(self, batch, block: ChainBlock, plan_lens):
        """The drafter's forward over the block -> what the draft head makes of rows 1..B-1: drafts [bs * (B-1)]
        (chain), or (log-probs, tokens) [bs * (B-1), k] (tree)."""
        bs = block.block_ids.shape[0]
        block_ids = block.block_ids.reshape(-1)
        plan_lens_cpu, plan_lens_sum = plan_lens
        forward_batch = ForwardBatch(
            forward_mode=ForwardMode.TARGET_VERIFY,
            batch_size=bs,
            input_ids=block_ids,
            req_pool_indices=batch.req_pool_indices,
            seq_lens=batch.seq_lens,
            out_cache_loc=block.slots.reshape(-1),
            seq_lens_sum=plan_lens_sum,
            seq_lens_cpu=plan_lens_cpu,
            positions=block.positions.reshape(-1),
            spec_algorithm=SpeculativeAlgorithm.DFLASH,
            spec_info=self.draft_block_spec,
            capture_hidden_mode=CaptureHiddenMode.NULL,
        )
        out = self.draft_runner.forward(forward_batch)
        # Only the decode-graph runner replays TARGET_VERIFY (the prefill graph refuses it), and its graphs
        # contain the head, so a graph run has already written the drafts.
        if out.can_run_graph and self.draft_head.graph_tokens is not None:
            return self.draft_head.graph_output(bs)
        return self.draft_head(out.logits_output.hidden_states)

    def verify(self, batch, candidates, positions, slots, plan_lens, custom_mask=None,
               **fields) -> GenerationBatchResult:
        """The target's TARGET_VERIFY forward over the candidates [bs, width], with features captured at every
        row; a chain is causal, a tree brings its mask. `fields`: more batch fields in place of the batch's (a
        prefill's rows bring their own lengths and requests)."""
        spec = DFlashVerifyInput(
            draft_token=candidates.reshape(-1),
            # A copy: SGLang's Gemma 4 forward shifts its positions in place when it runs eagerly (graphs off, or a
            # batch past --cuda-graph-max-bs), and the chain writes the drafter's context K/V from these positions.
            positions=positions.reshape(-1).clone(),
            draft_token_num=candidates.shape[1],
            custom_mask=custom_mask,
            capture_hidden_mode=CaptureHiddenMode.FULL,
        )
        return self.target_forward(batch, plan_lens, input_ids=spec.draft_token, spec_info=spec,
                                   forward_mode=ForwardMode.TARGET_VERIFY, out_cache_loc=slots.reshape(-1), **fields)

    def plain_forward(self, batch, block: ChainBlock, plan_lens) -> GenerationBatchResult:
        """A plain step's target forward as SGLang's own decoding runs it (DECODE mode, on the plain step's backend
        and DECODE graphs): the anchor at the committed length, its features captured."""
        return self.target_forward(
            batch, plan_lens, input_ids=block.block_ids.reshape(-1), spec_info=None, forward_mode=ForwardMode.DECODE,
            out_cache_loc=block.slots.reshape(-1),
            # A DECODE batch's lengths count the token it computes; the host bounds still bound them.
            seq_lens=block.positions.reshape(-1) + 1)

    def target_forward(self, batch, plan_lens, **fields) -> GenerationBatchResult:
        """The target's forward over `batch` with `fields` in place of its own and the host length bounds
        `plan_lens`, features captured at every row, unsampled."""
        plan_lens_cpu, plan_lens_sum = plan_lens
        with overridden(batch, seq_lens_cpu=plan_lens_cpu, seq_lens_sum=plan_lens_sum, **fields):
            forward_batch = ForwardBatch.init_new(
                batch,
                self.model_runner,
                capture_hidden_mode=CaptureHiddenMode.FULL,
                return_hidden_states_before_norm=False,
            )
        return self.target_worker.forward_batch_generation(None, forward_batch=forward_batch, is_verify=True)

    def accept(self, candidates, logits, sampling_info, seq_lens) -> ChainStep:
        bs, block = candidates.shape
        if sampling_info is not None:
            apply_sampling_adjustments(logits, sampling_info, block)
        logits = logits.view(bs, block, -1)
        if sampling_info is None or sampling_info.is_all_greedy:
            return chain_accept_greedy(candidates, logits.argmax(dim=-1), seq_lens)
        # Filtering sorts every row's vocabulary; a few requests at a time bound those temporaries.
        step = max(1, SAMPLING_ROWS_PER_CHUNK // block)
        chunks = [
            sampled_accept(candidates[lo : lo + step], logits[lo : lo + step], sampling_info, slice(lo, lo + step))
            for lo in range(0, bs, step)
        ]
        accept_len, bonus = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        return chain_step(candidates, accept_len, bonus, seq_lens)

    def accept_tree(self, tree, logits, sampling_info) -> VerifyResult:
        """Greedy or lossless sampling acceptance of the tree on the GPU (our kernels, or their references)."""
        bs, width = tree.tokens.shape
        max_depth = self.block_size - 1
        if sampling_info is not None:
            apply_sampling_adjustments(logits, sampling_info, width)
        if sampling_info is None or sampling_info.is_all_greedy:
            predicted = logits.argmax(dim=-1).view(bs, width)
            return verify_tree_greedy(tree.tokens, tree.first_child, tree.next_sibling, predicted, max_depth)
        logits = logits.view(bs, width, -1)
        step = max(1, SAMPLING_ROWS_PER_CHUNK // width)
        chunks = []
        for lo in range(0, bs, step):
            part = slice(lo, lo + step)
            probs = sampling_rows(logits[part], sampling_info, part)
            coins, race = draw_verify_randoms(probs.shape[0], width, probs.shape[-1], logits.device)
            chunks.append(verify_tree_sampling(tree.tokens[part], tree.first_child[part], tree.next_sibling[part],
                                               probs, coins, race, max_depth))
        return VerifyResult(*(torch.cat(fields) for fields in zip(*chunks)))


def check_startup(server_args, target_runner, tree: TreeSettings | None = None, adaptive: bool = False,
                  splitkv: bool = False, fp8_head: bool = False) -> tuple[DFlashConfig, TargetInfo]:
    """Validate the drafter/target pair and the serving flags; raise DFlashConfigError listing every problem."""
    block = int(server_args.speculative_num_draft_tokens)
    errors: list[str] = []
    config = target = None
    try:
        config = load_drafter_config(
            checkpoint_dir(server_args.speculative_draft_model_path, server_args.speculative_draft_model_revision)
        )
    except DFlashConfigError as e:
        errors += e.messages
    try:
        target = TargetInfo.from_path(checkpoint_dir(server_args.model_path, server_args.revision))
    except DFlashConfigError as e:
        errors += e.messages
    if tree is not None and config is not None:
        errors += check_tree(tree, config.block_size, block, server_args.attention_backend)
        block = config.block_size  # the drafter's block; the tree's width is the verify's
    if config is not None and target is not None:
        errors += validate_pair(config, target, block)
    if config is not None and target is not None and not target.model_type.startswith("gemma4"):
        last = target.num_hidden_layers - 1
        if last in config.target_layer_ids:
            # SGLang captures layer k's output "before layer k+1"; for the last layer there is none (Gemma 4
            # targets capture it specially).
            errors.append(
                f"drafter `dflash_config.target_layer_ids` {list(config.target_layer_ids)} includes the target's last "
                f"layer {last}, whose output SGLang cannot capture for a {target.model_type} target; use ids up to "
                f"{last - 1} (published drafters use [1, L-3])"
            )
    if config is not None:
        ids = list(config.target_layer_ids)
        if ids != sorted(set(ids)):
            errors.append(
                f"drafter `dflash_config.target_layer_ids` {ids} must be strictly increasing: SGLang concatenates the "
                f"captured target layers in layer order, so any other order feeds `fc` permuted features"
            )
        bidirectional_sliding = [
            i for i, kind in enumerate(config.layer_types)
            if kind == SLIDING_ATTENTION and not config.is_layer_causal(i)
        ]
        if bidirectional_sliding and config.sliding_window < block:
            # SGLang's attention windows only look left; a non-causal window is symmetric, which they only
            # express when the whole block fits inside it.
            errors.append(
                f"drafter layers {bidirectional_sliding} are non-causal sliding-window layers with `sliding_window` "
                f"= {config.sliding_window}, smaller than the block (--speculative-num-draft-tokens {block}); "
                f"use a block of at most {config.sliding_window}"
            )
        if config.block_size != block:
            logger.warning(
                "dflash_sglang: serving blocks of %d tokens but the drafter was trained with block_size %d",
                block, config.block_size,
            )
    if adaptive:
        errors += check_adaptive(server_args)
    if splitkv:
        errors += check_splitkv(server_args)
    if server_args.speculative_draft_window_size is not None:
        errors.append(
            "--speculative-draft-window-size is not supported by dflash_sglang; drop it, or set "
            "DFLASH_SGLANG_DISABLE=1 to use SGLang's builtin DFLASH worker"
        )
    if mambaish_config(target_runner.model_config) is not None:
        errors.append(
            "hybrid Mamba / linear-attention targets are not supported by dflash_sglang (their state is not "
            "rolled back after a partial accept); set DFLASH_SGLANG_DISABLE=1 to use SGLang's builtin DFLASH worker"
        )
    head_weight = getattr(getattr(target_runner.model, "lm_head", None), "weight", None)
    if head_weight is None or not torch.is_floating_point(head_weight):
        errors.append(
            "the target must expose an unquantized `lm_head.weight` (the drafter reads its logits through it); "
            "serve an unquantized head or set DFLASH_SGLANG_DISABLE=1"
        )
    elif fp8_head:
        errors += check_fp8_head(head_weight)
    if errors:
        raise DFlashConfigError(errors)
    return config, target


def checkpoint_dir(path: str, revision: str | None) -> str:
    """A local directory holding the checkpoint's config.json (hub ids resolve through the HF cache)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=path, revision=revision, allow_patterns=["*.json"])


class DraftWorkerHandle:
    """The draft TpModelWorker as SGLang's scheduler expects a V2 spec worker's `draft_worker` to look: it
    reaches the draft runner as `.draft_runner` (draft KV pool lookups) and `.draft_runners` (weight updates)."""

    def __init__(self, tp_worker: TpModelWorker):
        self.tp_worker = tp_worker
        self.draft_runner = tp_worker.model_runner

    @property
    def draft_runners(self) -> list:
        return [self.draft_runner]

    def __getattr__(self, name):
        if name == "tp_worker":
            raise AttributeError(name)
        return getattr(self.tp_worker, name)


def build_draft_worker(server_args, gpu_id: int, ps, nccl_port: int, target_runner, block_size: int) -> TpModelWorker:
    """The drafter's own TpModelWorker: shares the target's slot mapping and allocator, owns a KV pool. Its
    runner's TARGET_VERIFY width (attention layout, CUDA graphs) is the drafter's block, also in tree mode."""
    backend = server_args.speculative_draft_attention_backend or server_args.attention_backend
    draft_args = deepcopy(server_args)
    draft_args.override(
        "dflash_sglang.draft_worker",
        skip_tokenizer_init=True,
        attention_backend=backend,
        speculative_draft_attention_backend=backend,
        prefill_attention_backend=None,
        decode_attention_backend=None,
        context_length=target_runner.model_config.context_len,
        speculative_num_draft_tokens=block_size,
    )
    published = get_server_args()
    try:
        return TpModelWorker(
            server_args=draft_args, gpu_id=gpu_id, ps=ps, nccl_port=nccl_port, is_draft_worker=True,
            context_length=target_runner.model_config.context_len,
        )
    finally:
        # The process-wide args must stay the target's, whatever the draft runner's init published.
        get_context().set_server_args(published)


def make_draft_head(lm_head, config: DFlashConfig, target: TargetInfo, block_size: int,
                    tree: TreeSettings | None = None, fp8: bool = False) -> GreedyDraftHead:
    shard = getattr(lm_head, "shard_indices", None)
    if shard is None:
        # A head without shard metadata (e.g. Gemma's tied embedding) is replicated on every rank.
        num_rows, vocab_start, tp_group = lm_head.weight.shape[0], 0, None
    else:
        num_rows, vocab_start = shard.num_org_elements, shard.org_vocab_start_index
        group = get_tp_group()
        tp_group = group if group.world_size > 1 else None
    weight = Fp8HeadWeight.quantize(lm_head.weight) if fp8 else lm_head.weight
    common = dict(num_rows=num_rows, vocab_start=vocab_start, logit_multiplier=config.output_multiplier,
                  softcap=default_softcap(config, target), tp_group=tp_group)
    if tree is not None:
        return TopkDraftHead(weight, block_size, topk=tree.topk, **common)
    return GreedyDraftHead(weight, block_size, **common)


def max_graph_batch(server_args) -> int:
    """The largest batch the decode CUDA graphs are captured for (0: graphs off)."""
    return max(server_args.cuda_graph_config.decode.bs or [], default=0)


def verify_graph_context(draft_model, draft_runner, block_size: int, tree: TreeSettings | None, graph_batch: int,
                         device) -> VerifyGraphContext:
    """The context writes the target's verify graphs hold: a chain server's block and plain steps; a tree server's
    chain and plain steps (its adaptive widths) and its tree, unless the tree verifies as many tokens as the
    block (then its graphs serve the chain steps too, whose positions are not staged: its tree steps write after
    the forward)."""
    if tree is None:
        return VerifyGraphContext(draft_model, draft_runner, (block_size, PLAIN_WIDTH))
    causal = candidate_widths(tree.verify_width, block_size)[1:]
    tree_width = tree.verify_width if tree.verify_width != block_size else None
    return VerifyGraphContext(draft_model, draft_runner, causal, tree_width, graph_batch * tree.verify_width, device)


def draft_block_spec(block_size: int, device) -> DFlashVerifyInput:
    """The spec_info of every drafter forward, as the builtin's (draft_worker_common.make_draft_block_spec_info).

    The draft runner's CUDA graphs replay only while it passes DecodeCudaGraphRunner.can_run_graph: its
    num_tokens_per_req (draft_token_num) must be the runner's captured width, and its capture mode NULL, what the
    draft graphs were captured with (tests/test_sglang_plugin.py checks this against SGLang's own predicate).
    """
    return DFlashVerifyInput(
        draft_token=torch.empty((0,), dtype=torch.int64, device=device),
        positions=torch.empty((0,), dtype=torch.int64, device=device),
        draft_token_num=block_size,
        custom_mask=None,
        capture_hidden_mode=CaptureHiddenMode.NULL,
    )


def step_result(logits_output, emitted: torch.Tensor, commit_lens: torch.Tensor, bonus: torch.Tensor,
                new_seq_lens: torch.Tensor, can_run_cuda_graph: bool, draft_tokens: int) -> GenerationBatchResult:
    """A decode step's result for SGLang's scheduler: the emitted tokens [bs, W] (the first commit_lens of each row
    count), the next step's anchors and lengths, and `draft_tokens`, the row stride of `emitted` and of the logits
    it reads per request."""
    return GenerationBatchResult(
        logits_output=logits_output,
        next_token_ids=emitted.reshape(-1),
        accept_lens=commit_lens,
        can_run_cuda_graph=can_run_cuda_graph,
        next_draft_input=next_draft_state(bonus, new_seq_lens),
        speculative_num_draft_tokens=draft_tokens,
        new_seq_lens=new_seq_lens,
    )


def next_draft_state(bonus: torch.Tensor, new_seq_lens: torch.Tensor) -> DraftState:
    """The carrier SGLang relays between steps; only the anchor and the lengths are DFLASH state."""
    bs, device = bonus.shape[0], bonus.device
    return DraftState(
        topk_p=torch.empty((bs, 0), dtype=torch.float32, device=device),
        topk_index=torch.empty((bs, 0), dtype=torch.int64, device=device),
        bonus_tokens=bonus.long(),
        new_seq_lens=new_seq_lens.long(),
        hidden_states=torch.empty((bs, 0), dtype=torch.float16, device=device),
    )


def planning_seq_lens(batch: ScheduleBatch, state: DFlashDraftInputV2, block_size: int) -> tuple[torch.Tensor, int]:
    """Host-side upper bound of the lengths attention backends plan with, without reading the device.

    committed + B when the scheduler mirrored the committed lengths on the host, else the reservation that
    prepare_for_decode made (>= committed + 2B).
    """
    if batch.seq_lens_cpu is not None:
        lens = batch.seq_lens_cpu + block_size
    else:
        lens = state.reserved_seq_lens_cpu
    return lens, int(lens.sum())


def extend_positions(prefix_lens: list[int], extend_lens: list[int], device) -> torch.Tensor:
    """Positions of the tokens an extend batch computes: prefix_len + 0..extend_len-1 per request."""
    starts = torch.tensor(prefix_lens, dtype=torch.int64)
    lens = torch.tensor(extend_lens, dtype=torch.int64)
    first_index = torch.cumsum(lens, dim=0) - lens
    offsets = torch.arange(int(lens.sum())) - torch.repeat_interleave(first_index, lens)
    return (torch.repeat_interleave(starts, lens) + offsets).to(device, non_blocking=True)


def sampled_accept(candidates, logits, sampling_info, requests: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling acceptance for the requests `requests` of the batch; logits [n, B, V] are theirs."""
    return sampling_accept(candidates, sampling_rows(logits, sampling_info, requests))


def sampling_rows(logits: torch.Tensor, sampling_info, requests: slice) -> torch.Tensor:
    """The target's sampling distributions [n, W, V] of the requests `requests`, from their verify logits."""
    num_requests, width, vocab = logits.shape

    def rows(values: torch.Tensor, needed: bool = True) -> torch.Tensor | None:
        return per_row(values.reshape(-1)[requests], width) if needed else None

    probs = filtered_probs(
        logits.reshape(-1, vocab),
        rows(sampling_info.temperatures),
        rows(sampling_info.top_ks, sampling_info.need_top_k_sampling),
        rows(sampling_info.top_ps, sampling_info.need_top_p_sampling),
        rows(sampling_info.min_ps, sampling_info.need_min_p_sampling),
    )
    return probs.view(num_requests, width, vocab)


def per_row(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """A per-request sampling parameter ([bs] or [bs, 1]) repeated for each of its B verify rows."""
    return values.reshape(-1).repeat_interleave(block_size)


def apply_sampling_adjustments(logits: torch.Tensor, sampling_info, block_size: int) -> None:
    """Penalties, logit bias and custom processors on every verify row [bs * B, V], in place.

    They are per request, so each of the B rows of a request gets its request's adjustment (as in a plain
    decode step; the block's own earlier tokens are not counted by repetition penalties).
    """
    if sampling_info.has_custom_logit_processor:
        apply_custom_logit_processor(logits, sampling_info, num_tokens_in_batch=block_size)
    orchestrator = sampling_info.penalizer_orchestrator
    if (
        sampling_info.acc_additive_penalties is None
        and sampling_info.acc_scaling_penalties is None
        and not (orchestrator is not None and orchestrator.is_required)
        and sampling_info.vocab_mask is None
        and sampling_info.logit_bias is None
    ):
        return
    rows = logits.view(-1, block_size, logits.shape[-1])
    for j in range(block_size):
        column = rows[:, j].contiguous()
        sampling_info.apply_logits_bias(column)
        rows[:, j] = column


@contextlib.contextmanager
def overridden(batch: ScheduleBatch, **fields):
    """Set ScheduleBatch fields for the duration of a block (the verify ForwardBatch is built from them)."""
    saved = {name: getattr(batch, name) for name in fields}
    for name, value in fields.items():
        setattr(batch, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(batch, name, value)
