"""The adaptive width inside SGLang (`--speculative-dflash-adaptive`): the target keeps a set of verify resources
per candidate width: the speculative width's (what SGLang built at startup), width 1's (a plain decoding step: the
anchor verified alone) and, in tree mode, the drafter's block's (a chain step). The worker swaps them per step as
`dflash_sglang.adaptive.WidthController` chooses.

A plain step runs the target the way SGLang's own decoding does when it can: a DECODE forward (decode attention
metadata and kernels, DECODE graphs captured with the hidden states the drafter's context needs), which costs
less host time per step than a TARGET_VERIFY forward of width 1 (0.93 ms against AR's 0.67 ms per graph replay on
the H200 in the ninth session). The DECODE graphs are captured while the model runner's algorithm reads NONE, since
SGLang captures every decode graph of a speculative runner as TARGET_VERIFY; if that fails, plain steps fall back
to a width-1 TARGET_VERIFY (logged), which is also what they are on targets with sliding-window layers.

Why a set per width: a model runner's verify CUDA graphs are captured for one width (`num_tokens_per_req`), and
the attention backend sizes its graph buffers and verify layout from `--speculative-num-draft-tokens` when it is
built; a graph runner built over an existing backend re-initializes its buffers, leaving the first runner's graphs
pointing at buffers nobody fills. So each other width gets its own backend (over the same KV pool) and its own
graph runner, built while the server arguments say that width, the way SGLang 0.5.16's EAGLE adaptive mode builds
its per-step states (eagle_worker_v2.build_adaptive_runtime_state). Their graphs are causal even in tree mode (a
one-token verify has nothing to mask, a chain is causal). The KV reservation stays the speculative width's; a
plain step uses one slot of it, a tree server's chain step one block of it.

Served with tensor parallelism, every rank would time its own steps and could choose differently, and ranks that
run different widths deadlock in their collectives: the flag is refused there.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from dflash_sglang.adaptive import PLAIN_WIDTH
from dflash_sglang.config import DFlashConfigError
from dflash_sglang.sglang import tree_mode
from dflash_sglang.sglang.env import env_flag
from dflash_sglang.sglang.verify_attention import use_splitkv_verify

logger = logging.getLogger(__name__)

ADAPTIVE_ENV = "DFLASH_SGLANG_ADAPTIVE"
# The widths the controller may choose from (default: the speculative width and 1); a single one pins it, which is
# how a benchmark prices each width alone on the same server build (e.g. plain steps only, against AR).
WIDTHS_ENV = "DFLASH_SGLANG_ADAPTIVE_WIDTHS"


def adaptive_from_env(environ=os.environ) -> bool:
    return env_flag(ADAPTIVE_ENV, environ)


def candidate_widths(verify_width: int, chain_width: int | None = None) -> tuple[int, ...]:
    """Every width a server can run, speculative first: its verify width, the chain's block in tree mode
    (`chain_width`, unless the tree verifies as many tokens), and 1 (a plain step)."""
    return tuple(dict.fromkeys(w for w in (verify_width, chain_width, PLAIN_WIDTH) if w is not None))


def widths_from_env(verify_width: int, chain_width: int | None = None, environ=os.environ) -> tuple[int, ...]:
    """The adaptive width's candidates, speculative first: all of `candidate_widths` by default, or those
    WIDTHS_ENV lists."""
    every = candidate_widths(verify_width, chain_width)
    raw = environ.get(WIDTHS_ENV, "").strip()
    if not raw:
        return every
    try:
        listed = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        listed = []
    if not listed or any(w not in every for w in listed) or len(set(listed)) != len(listed):
        names = [f"{verify_width} (this server's {'speculative' if chain_width is None else 'tree'} verify)"]
        if chain_width not in (None, verify_width):
            names.append(f"{chain_width} (a chain step of the drafter's block)")
        raise DFlashConfigError([
            f"{WIDTHS_ENV}={raw!r} must list distinct widths among {', '.join(names)} and {PLAIN_WIDTH} (a plain "
            f"step), comma-separated; unset it to let the controller use them all"
        ])
    return tuple(w for w in every if w in listed)


def check_adaptive(server_args) -> list[str]:
    """Every reason the adaptive width cannot be served with these flags."""
    errors = []
    parallel = {"--tp-size": server_args.tp_size, "--pp-size": server_args.pp_size, "--dp-size": server_args.dp_size}
    for flag, size in parallel.items():
        if int(size or 1) > 1:
            errors.append(
                f"--speculative-dflash-adaptive needs a single rank ({flag} is {size}): each rank would choose its "
                f"own width from its own timings and the ranks' collectives would stop matching; drop the flag"
            )
    return errors


@dataclass
class VerifyResources:
    """What the target's model runner reads for a verify of `width` tokens per request."""

    width: int
    attn_backend: object
    graph_runner: object | None  # None: graphs are off, the verify runs eagerly
    decode: bool = False  # a plain step's resources for a DECODE forward, not a TARGET_VERIFY one

    @classmethod
    def current(cls, model_runner, width: int) -> VerifyResources:
        return cls(width, model_runner.attn_backend, model_runner.decode_cuda_graph_runner)

    def apply(self, model_runner) -> None:
        model_runner.attn_backend = self.attn_backend
        model_runner.decode_cuda_graph_runner = self.graph_runner


def build_verify_resources(model_runner, width: int, server_args_objects, splitkv: bool = False) -> VerifyResources:
    """A fresh attention backend and (when the runner has decode graphs) a graph runner for verifies of `width`
    tokens per request, built and captured while every object in `server_args_objects` says that width; they are
    restored after, so the KV reservation and everything else keep the speculative width. `splitkv`: their causal
    verifies attend through the split-KV kernel (verify_attention.py)."""
    with overridden_arguments(server_args_objects, speculative_num_draft_tokens=width):
        with tree_mode.causal_verify_capture():
            return VerifyResources(width, *new_backend_and_graphs(model_runner, width, splitkv))


def build_plain_decode_resources(model_runner, server_args_objects) -> VerifyResources:
    """A fresh attention backend and DECODE graphs for plain steps, with full hidden-state capture, built while the
    runner's algorithm reads NONE and the arguments say width 1 and hidden states returned; all restored after."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    saved_algorithm = model_runner.spec_algorithm
    try:
        model_runner.spec_algorithm = SpeculativeAlgorithm.NONE
        with overridden_arguments(server_args_objects, speculative_num_draft_tokens=PLAIN_WIDTH,
                                  enable_return_hidden_states=True):
            return VerifyResources(PLAIN_WIDTH, *new_backend_and_graphs(model_runner, PLAIN_WIDTH), decode=True)
    finally:
        model_runner.spec_algorithm = saved_algorithm


def build_plain_resources(model_runner, server_args_objects, splitkv: bool = False) -> VerifyResources:
    """A plain step's resources: DECODE ones, or width-1 TARGET_VERIFY ones on a target with sliding-window layers
    (SGLang 0.5.16's triton decode reads one key fewer than the window, its verify the whole window: a DECODE plain
    step would not compute what the verifies around it do) or if the DECODE ones cannot be built."""
    window = getattr(model_runner, "sliding_window_size", None)
    if window is not None:
        logger.info("dflash_sglang: the target has sliding-window layers (window %s): plain steps verify one token "
                    "(TARGET_VERIFY), whose attention reads the window as the speculative verifies do", window)
    else:
        try:
            return build_plain_decode_resources(model_runner, server_args_objects)
        except Exception:
            logger.warning("dflash_sglang: plain steps cannot run as DECODE forwards here; they verify one token "
                           "(TARGET_VERIFY) instead", exc_info=True)
    return build_verify_resources(model_runner, PLAIN_WIDTH, server_args_objects, splitkv)


@contextlib.contextmanager
def overridden_arguments(server_args_objects, **fields):
    """Every distinct object in `server_args_objects` says `fields` inside, what it said before after."""
    distinct = list({id(args): args for args in server_args_objects}.values())
    saved = [(args, {name: getattr(args, name) for name in fields}) for args in distinct]
    try:
        for args in distinct:
            args.override("dflash_sglang.adaptive_width", **fields)
        yield
    finally:
        for args, values in saved:
            args.override("dflash_sglang.adaptive_width", **values)


def new_backend_and_graphs(model_runner, width: int, splitkv: bool = False) -> tuple[object, object | None]:
    """A new attention backend of the runner's kind (its own workspace), on the split-KV verify kernel if `splitkv`,
    and, when the runner has decode graphs, a graph runner over it capturing `width` tokens per request."""
    from sglang.srt.model_executor.runner import DecodeCudaGraphRunner

    had_workspace_flag = hasattr(model_runner, "init_new_workspace")
    workspace_flag = getattr(model_runner, "init_new_workspace", None)
    try:
        backend = model_runner._get_attention_backend(init_new_workspace=True)
        if splitkv:
            use_splitkv_verify(backend)
        runner = None
        if model_runner.decode_cuda_graph_runner is not None:
            runner = DecodeCudaGraphRunner(model_runner, attn_backend=backend, speculative_num_draft_tokens=width)
    finally:
        if had_workspace_flag:
            model_runner.init_new_workspace = workspace_flag
    return backend, runner
