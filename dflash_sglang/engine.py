"""Reference DFlash generation: `ar`, `chain` and `tree` modes, batched, incremental, greedy or sampled.

One decode step (chain/tree):
1. draft: the drafter denoises `[anchor, MASK x (B-1)]` at positions `start .. start+B-1` against its context
   cache (target features of committed tokens) -> per-depth logits for depths 1..B-1;
2. propose: a chain (argmax, or samples from q) or a best-first tree over per-depth top-k;
3. verify: one target forward over the proposal, positions `start + depth`, ancestor-only mask;
4. accept: greedy exact match, or lossless speculative sampling;
5. commit: the accepted root path stays in the target cache, the rest is dropped; its target features become
   drafter context; the bonus token becomes the next anchor.
Greedy output is token-for-token the target's own greedy decoding; sampled output has the target's distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dflash_sglang.config import DFlashConfig, TargetInfo, check_pair, default_softcap, load_drafter_config
from dflash_sglang.drafter import ContextCache, DFlashDrafter
from dflash_sglang.loader import load_drafter_state_dict
from dflash_sglang.target import TargetCache, TargetModel
from dflash_sglang.tree import DraftTree, build_tree, chain_tree
from dflash_sglang.verify import (SamplingParams, greedy_verify, sample, sampling_probs, sampling_verify_chain,
                                  sampling_verify_tree)

MODES = ("ar", "chain", "tree")
LOGPROB_FLOOR = -1e4


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    acceptance_lengths: list[list[int]]
    seconds: float = 0.0
    target_forwards: int = 0

    @property
    def mean_acceptance(self) -> float:
        """Mean committed tokens per verify step (accepted drafts + bonus), over all requests' steps."""
        steps = [a for row in self.acceptance_lengths for a in row]
        return sum(steps) / len(steps) if steps else 0.0

    @property
    def num_generated(self) -> int:
        return sum(len(t) for t in self.tokens)


@dataclass
class _State:
    target_cache: TargetCache
    draft_cache: ContextCache | None
    anchor: torch.Tensor  # [bs] last emitted token, not yet in any cache
    start: torch.Tensor  # [bs] its position
    outputs: list[list[int]]
    accept: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)


class DFlashEngine:
    def __init__(self, target: TargetModel, drafter: DFlashDrafter | None, softcap: float | None = None):
        self.target = target
        self.drafter = drafter
        self.softcap = softcap

    @classmethod
    def load(cls, target_path: str | Path, drafter_path: str | Path | None, dtype=torch.float32, device="cpu") -> DFlashEngine:
        if drafter_path is None:
            return cls(TargetModel.load(target_path, (), dtype, device), None)
        cfg = load_drafter_config(drafter_path)
        info = TargetInfo.from_path(target_path)
        check_pair(cfg, info)
        drafter = build_drafter(cfg, load_drafter_state_dict(drafter_path, cfg), dtype, device)
        target = TargetModel.load(target_path, cfg.target_layer_ids, dtype, device)
        return cls(target, drafter, default_softcap(cfg, info))

    @property
    def cfg(self) -> DFlashConfig:
        return self.drafter.cfg

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, mode: str = "chain",
                 params: SamplingParams = SamplingParams(), block_size: int | None = None, tree_budget: int | None = None,
                 tree_topk: int = 4, eos_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationResult:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "ar" and self.drafter is None:
            raise ValueError(f"mode {mode!r} needs a drafter")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        started = time.perf_counter()
        state = self._prefill(prompts, mode != "ar", params, generator)
        forwards = 1
        self._check_done(state, max_new_tokens, eos_token_id)
        block = block_size or (self.cfg.block_size if self.drafter is not None else 1)
        while not all(state.done):
            if mode == "ar":
                self._ar_step(state, params, generator)
            else:
                self._spec_step(state, mode, params, block, tree_budget or block - 1, tree_topk, generator)
            forwards += 1
            self._check_done(state, max_new_tokens, eos_token_id)
        return GenerationResult(state.outputs, state.accept, time.perf_counter() - started, forwards)

    def _pick(self, logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
        if params.greedy:
            return logits.argmax(-1)
        return sample(sampling_probs(logits, params), generator)

    def _prefill(self, prompts, with_drafter: bool, params, generator) -> _State:
        bs, dev = len(prompts), self.target.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros(bs, width, dtype=torch.long, device=dev)
        real = torch.zeros(bs, width, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, device=dev)
            real[b, : len(p)] = True
        positions = torch.arange(width, device=dev).expand(bs, -1)
        causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril()
        # Real tokens see earlier real tokens; padding only itself (it is dropped at commit).
        intra = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=dev)
        cache = self.target.new_cache(bs)
        logits, features = self.target.forward(cache, ids, positions, intra)
        self.target.commit(cache, real)
        lengths = real.sum(1)
        last = logits[torch.arange(bs, device=dev), lengths - 1]
        first = self._pick(last, params, generator)
        draft_cache = None
        if with_drafter:
            draft_cache = ContextCache.empty(self.cfg, bs, dev, self.target.dtype)
            keys, values = self.drafter.context_kv(features, positions)
            draft_cache.append(keys, values, positions, real)
        return _State(cache, draft_cache, first, lengths.clone(), [[int(t)] for t in first.tolist()],
                      [[] for _ in range(bs)], [False] * bs)

    def _check_done(self, state: _State, max_new_tokens: int, eos: int | None) -> None:
        for b, out in enumerate(state.outputs):
            if state.done[b]:
                continue
            if eos is not None and eos in out:
                del out[out.index(eos) + 1:]
                state.done[b] = True
            if len(out) >= max_new_tokens:
                del out[max_new_tokens:]
                state.done[b] = True

    def _emit(self, state: _State, new_tokens: list[list[int]], commit_lens: list[int] | None) -> None:
        for b, toks in enumerate(new_tokens):
            if state.done[b]:
                continue
            state.outputs[b].extend(toks)
            if commit_lens is not None:
                state.accept[b].append(commit_lens[b])

    def _ar_step(self, state: _State, params, generator) -> None:
        bs, dev = state.anchor.shape[0], state.anchor.device
        one = torch.ones(bs, 1, 1, dtype=torch.bool, device=dev)
        logits, _ = self.target.forward(state.target_cache, state.anchor[:, None], state.start[:, None], one)
        self.target.commit(state.target_cache, torch.ones(bs, 1, dtype=torch.bool, device=dev))
        nxt = self._pick(logits[:, 0], params, generator)
        self._emit(state, [[t] for t in nxt.tolist()], None)
        state.anchor, state.start = nxt, state.start + 1

    def draft_logits(self, state_anchor: torch.Tensor, start: torch.Tensor, cache: ContextCache, block: int) -> torch.Tensor:
        """Drafter logits [bs, B-1, V] for block depths 1..B-1 (no shift: row j predicts the token at depth j)."""
        bs, dev = state_anchor.shape[0], state_anchor.device
        ids = torch.full((bs, block), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        ids[:, 0] = state_anchor
        positions = start[:, None] + torch.arange(block, device=dev)
        embeds = self.target.embed(ids) * self.cfg.input_embedding_scale
        hidden = self.drafter(embeds, positions, cache)
        return self.drafter.logits(hidden[:, 1:], self.target.lm_head, self.softcap)

    def _propose(self, state: _State, logits: torch.Tensor, mode: str, params, budget: int, topk: int, generator):
        if mode == "chain":
            if params.greedy:
                return chain_tree(state.anchor, logits.argmax(-1)), None
            q = sampling_probs(logits, params)
            return chain_tree(state.anchor, sample(q, generator)), q
        # Filtered tokens have probability 0; a finite floor keeps tree scores ordered (-inf - -inf is NaN).
        scores = logits.log_softmax(-1) if params.greedy else sampling_probs(logits, params).log().clamp(min=LOGPROB_FLOOR)
        return build_tree(state.anchor, scores, budget, topk), None

    def _spec_step(self, state: _State, mode, params, block, budget, topk, generator) -> None:
        bs, dev = state.anchor.shape[0], state.anchor.device
        logits = self.draft_logits(state.anchor, state.start, state.draft_cache, block)
        tree, q = self._propose(state, logits, mode, params, budget, topk, generator)
        positions = state.start[:, None] + tree.depths
        target_logits, features = self.target.forward(state.target_cache, tree.tokens, positions, tree.ancestor_mask())
        path, accept_len, bonus = self._accept(tree, target_logits, q, params, generator)
        on_path = path >= 0
        keep = torch.zeros(bs, tree.num_nodes, dtype=torch.bool, device=dev)
        # Padding (-1) maps to the root, which is always on the path.
        keep.scatter_(1, path.clamp(min=0), True)
        self.target.commit(state.target_cache, keep)
        path_features = torch.gather(features, 1, path.clamp(min=0)[:, :, None].expand(-1, -1, features.shape[-1]))
        path_positions = state.start[:, None] + torch.arange(path.shape[1], device=dev)
        keys, values = self.drafter.context_kv(path_features, path_positions)
        state.draft_cache.append(keys, values, path_positions, on_path)
        path_tokens = torch.gather(tree.tokens, 1, path.clamp(min=0))
        new_tokens = [path_tokens[b, 1 : 1 + int(accept_len[b])].tolist() + [int(bonus[b])] for b in range(bs)]
        self._emit(state, new_tokens, (accept_len + 1).tolist())
        state.anchor, state.start = bonus, state.start + accept_len + 1

    def _accept(self, tree: DraftTree, target_logits, q, params, generator):
        if params.greedy:
            return greedy_verify(tree, target_logits.argmax(-1))
        p = sampling_probs(target_logits, params)
        if q is not None:
            return sampling_verify_chain(tree, q, p, generator)
        return sampling_verify_tree(tree, p, generator)


def build_drafter(cfg: DFlashConfig, state_dict: dict[str, torch.Tensor], dtype, device) -> DFlashDrafter:
    drafter = DFlashDrafter(cfg)
    drafter.load_state_dict(state_dict, strict=True)
    return drafter.to(device=device, dtype=dtype).eval()
