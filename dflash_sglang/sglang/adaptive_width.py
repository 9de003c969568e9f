"""The adaptive width inside SGLang (`--speculative-dflash-adaptive`): the target keeps two sets of verify
resources, the speculative width's (what SGLang built at startup) and width 1's (a plain decoding step: the
anchor verified alone), and the worker swaps them per step as `dflash_sglang.adaptive.WidthController` chooses.

Why two sets: a model runner's verify CUDA graphs are captured for one width (`num_tokens_per_req`), and the
attention backend sizes its graph buffers and verify layout from `--speculative-num-draft-tokens` when it is
built; a graph runner built over an existing backend re-initializes its buffers, leaving the first runner's graphs
pointing at buffers nobody fills. So width 1 gets its own backend (over the same KV pool) and its own graph runner,
built while the server arguments say width 1, the way SGLang 0.5.16's EAGLE adaptive mode builds its per-step
states (eagle_worker_v2.build_adaptive_runtime_state). Its graphs are causal even in tree mode (a one-token verify
has nothing to mask). The KV reservation stays the speculative width's; a plain step uses one slot of it.

Served with tensor parallelism, every rank would time its own steps and could choose differently, and ranks that
run different widths deadlock in their collectives: the flag is refused there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from dflash_sglang.adaptive import PLAIN_WIDTH
from dflash_sglang.config import DFlashConfigError
from dflash_sglang.sglang import tree_mode

ADAPTIVE_ENV = "DFLASH_SGLANG_ADAPTIVE"
# The widths the controller may choose from (default: the speculative width and 1); a single one pins it, which is
# how a benchmark prices each width alone on the same server build (e.g. plain steps only, against AR).
WIDTHS_ENV = "DFLASH_SGLANG_ADAPTIVE_WIDTHS"


def adaptive_from_env(environ=os.environ) -> bool:
    return environ.get(ADAPTIVE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def widths_from_env(verify_width: int, environ=os.environ) -> tuple[int, ...]:
    """The adaptive width's candidates, speculative first: both by default, or those WIDTHS_ENV lists."""
    both = (verify_width, PLAIN_WIDTH)
    raw = environ.get(WIDTHS_ENV, "").strip()
    if not raw:
        return both
    try:
        listed = [int(part) for part in raw.split(",") if part.strip()]
    except ValueError:
        listed = []
    if not listed or any(w not in both for w in listed) or len(set(listed)) != len(listed):
        raise DFlashConfigError([
            f"{WIDTHS_ENV}={raw!r} must list distinct widths among {verify_width} (this server's speculative "
            f"verify) and {PLAIN_WIDTH} (a plain step), comma-separated; unset it to let the controller use both"
        ])
    return tuple(w for w in both if w in listed)


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

    @classmethod
    def current(cls, model_runner, width: int) -> VerifyResources:
        return cls(width, model_runner.attn_backend, model_runner.decode_cuda_graph_runner)

    def apply(self, model_runner) -> None:
        model_runner.attn_backend = self.attn_backend
        model_runner.decode_cuda_graph_runner = self.graph_runner


def build_verify_resources(model_runner, width: int, server_args_objects) -> VerifyResources:
    """A fresh attention backend and (when the runner has decode graphs) a graph runner for verifies of `width`
    tokens per request, built and captured while every object in `server_args_objects` says that width; they are
    restored after, so the KV reservation and everything else keep the speculative width."""
    from sglang.srt.model_executor.runner import DecodeCudaGraphRunner

    distinct = list({id(args): args for args in server_args_objects}.values())
    saved = [(args, args.speculative_num_draft_tokens) for args in distinct]
    had_workspace_flag = hasattr(model_runner, "init_new_workspace")
    workspace_flag = getattr(model_runner, "init_new_workspace", None)
    try:
        for args in distinct:
            args.override("dflash_sglang.adaptive_width", speculative_num_draft_tokens=width)
        with tree_mode.causal_verify_capture():
            backend = model_runner._get_attention_backend(init_new_workspace=True)
            runner = None
            if model_runner.decode_cuda_graph_runner is not None:
                runner = DecodeCudaGraphRunner(model_runner, attn_backend=backend, speculative_num_draft_tokens=width)
    finally:
        for args, value in saved:
            args.override("dflash_sglang.adaptive_width", speculative_num_draft_tokens=value)
        if had_workspace_flag:
            model_runner.init_new_workspace = workspace_flag
    return VerifyResources(width, backend, runner)
