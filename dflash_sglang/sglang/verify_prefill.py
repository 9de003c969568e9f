"""Prefills through the target's verify CUDA graphs (`--speculative-dflash-verify-prefill`).

dflash_sglang.prefill_rows says why a prefill can be laid out as verify rows and why that computes what SGLang's
prefill computes. Here: when a server can do it, and which prefill batches take it. The server needs verify
graphs of a causal width: a chain server's own (the drafter's block), or an adaptive tree server's chain-step
graphs; a tree server without the adaptive width verifies only under its tree mask and keeps SGLang's prefill.
Those graphs also write the drafter's context K/V of every row (verify_context.py), as the prefill's own write did.

A batch takes the path only when nothing in it needs what SGLang's prefill forward alone provides: input
logprobs or hidden states returned, input embeddings or multimodal inputs, LoRA, position schemes other than
plain positions (M-RoPE), sliding-window attention (the drafter's graphs are untested against its windows here);
and when its rows fit the largest captured graph, and its padded rows stay inside the context window. Every other
batch runs SGLang's prefill, as before. The first token is sampled by SGLang's own sampler from the logits of each
prompt's last token, so penalties, grammars and sampling parameters apply as in SGLang's prefill.
"""

from __future__ import annotations

import os

from dflash_sglang.sglang.env import env_switch

FLAG = "--speculative-dflash-verify-prefill"
ENV = "DFLASH_SGLANG_VERIFY_PREFILL"


def setting_from_env(environ=os.environ) -> bool | None:
    """True: the flag asked for it; False: `--no-speculative-dflash-verify-prefill`; None: the default, on wherever
    the server can (server_reason) and serves on one GPU (default_reason)."""
    return env_switch(ENV, environ)


def default_reason(server_args) -> str | None:
    """Why the default leaves this server on SGLang's prefill, or None. The path has been checked against plain
    decoding on one GPU only (scripts/device/e2e.sh); with tensor parallelism it runs when asked for."""
    if getattr(server_args, "tp_size", 1) > 1:
        return f"tensor parallelism (not yet checked there; {FLAG} turns it on)"
    return None


def server_reason(model_runner, server_args) -> str | None:
    """Why this server cannot prefill through verify graphs at all, or None."""
    config = model_runner.model_config
    if getattr(server_args, "enable_lora", False) or getattr(server_args, "lora_paths", None):
        return "LoRA adapters"
    if getattr(config, "is_multimodal", False):
        return "a multimodal target"
    if getattr(config, "model_is_mrope", False):
        return "M-RoPE positions"
    if getattr(model_runner, "sliding_window_size", None) not in (None, -1):
        return "sliding-window attention"
    return None


def batch_reason(batch, rows: int, max_rows: int, row_end: int, context_len: int) -> str | None:
    """Why this prefill batch must run SGLang's prefill (its rows and how far they reach already counted), or
    None. Reads host fields only."""
    if batch.return_logprob or getattr(batch, "return_hidden_states", False) or getattr(batch, "is_prefill_only",
                                                                                          False):
        return "logprobs, hidden states or a prefill-only request"
    if batch.input_embeds is not None or any(m is not None for m in (batch.multimodal_inputs or ())):
        return "input embeddings or multimodal inputs"
    if rows > max_rows:
        return f"{rows} verify rows, above the largest captured graph ({max_rows})"
    if row_end > context_len:
        return "rows padded past the context window"
    return None
