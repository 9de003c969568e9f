"""Target side of the reference engine: an HF transformers causal LM with feature capture and a slot cache.

The target KV cache is a plain `DynamicCache` that only ever grows by whole forwards; which slot is part of a
request's sequence is tracked here (`valid`, `positions`) and enforced by an explicit 4D mask, so chains,
trees and ragged batches all use one mechanism. Rejected slots are dropped by `commit` (compaction), never
recomputed. Features are the residual outputs of decoder layers `target_layer_ids` (HF `hidden_states[l+1]`),
captured with forward hooks so the last layer's pre-norm output is right too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from dflash_sglang.drafter import compaction_index, gather_slots

SLIDING = "sliding_attention"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM, text-only or the language model of a multimodal one."""
    for path in ("model.language_model.layers", "model.layers", "language_model.model.layers", "transformer.h"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}; supported: Qwen3, Llama, Gemma 4")


@dataclass
class TargetCache:
    """HF KV cache plus, per request row, the position and validity of every slot."""

    kv: DynamicCache
    positions: torch.Tensor  # [bs, S]
    valid: torch.Tensor  # [bs, S]

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)


class TargetModel:
    """Wraps an HF causal LM: masked incremental forward, feature capture, embedding and head access."""

    def __init__(self, model: nn.Module, target_layer_ids: tuple[int, ...] | list[int] = ()):
        self.model = model.eval()
        self.text_config = model.config.get_text_config(decoder=True)
        self.layers = decoder_layers(model)
        types = getattr(self.text_config, "layer_types", None) or []
        self.sliding_window = getattr(self.text_config, "sliding_window", None) if SLIDING in types else None
        self.softcap = getattr(self.text_config, "final_logit_softcapping", None)
        self.layer_ids = tuple(target_layer_ids)
        self._captured: dict[int, torch.Tensor] = {}
        for layer_id in self.layer_ids:
            self.layers[layer_id].register_forward_hook(self._capture_hook(layer_id))

    @classmethod
    def load(cls, path: str | Path, target_layer_ids=(), dtype: torch.dtype = torch.float32, device="cpu") -> TargetModel:
        config = AutoConfig.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, dtype=dtype, attn_implementation="sdpa")
        return cls(model.to(device), target_layer_ids)

    def _capture_hook(self, layer_id: int):
        def hook(_module, _inputs, output):
            self._captured[layer_id] = output[0] if isinstance(output, tuple) else output
        return hook

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings exactly as the target's first layer sees them (Gemma's sqrt(H) scale included)."""
        return self.model.get_input_embeddings()(ids)

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def new_cache(self, batch: int) -> TargetCache:
        dev = self.device
        return TargetCache(DynamicCache(), torch.empty(batch, 0, dtype=torch.long, device=dev),
                           torch.empty(batch, 0, dtype=torch.bool, device=dev))

    def _mask(self, cache: TargetCache, positions: torch.Tensor, intra: torch.Tensor, window: int | None) -> torch.Tensor:
        q = positions[:, :, None]
        past = cache.valid[:, None, :].expand(-1, positions.shape[1], -1)
        new = intra
        if window is not None:
            past = past & (q - cache.positions[:, None, :] < window)
            new = new & (q - positions[:, None, :] < window)
        return torch.cat([past, new], dim=2)[:, None]

    @torch.no_grad()
    def forward(self, cache: TargetCache, input_ids: torch.Tensor, positions: torch.Tensor, intra: torch.Tensor):
        """Run W new tokens per row; `intra[b, i, j]` says whether new token i sees new token j.

        Appends W slots (not yet valid: `commit` decides). Returns float logits [bs, W, V] and the
        concatenated target features [bs, W, K*H].
        """
        full = self._mask(cache, positions, intra, None)
        mask = full
        if self.sliding_window is not None:
            mask = {"full_attention": full, SLIDING: self._mask(cache, positions, intra, self.sliding_window)}
        self._captured.clear()
        out = self.model(input_ids=input_ids, position_ids=positions, attention_mask=mask,
                         past_key_values=cache.kv, use_cache=True)
        cache.positions = torch.cat([cache.positions, positions], dim=1)
        cache.valid = torch.cat([cache.valid, torch.zeros_like(positions, dtype=torch.bool)], dim=1)
        features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        return out.logits.float(), features

    @torch.no_grad()
    def causal_forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [bs, S, K*H] and final (normed) hidden states [bs, S, H] of every token of right-padded rows: one
        plain causal forward of the decoder, no cache, no explicit mask, no head (training). Padding follows every
        real token, so causal attention alone keeps it out of the real tokens' states, and attention runs its
        mask-free causal kernel."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        self._captured.clear()
        out = self.model.get_decoder()(input_ids=input_ids, position_ids=positions, use_cache=False)
        return torch.cat([self._captured[i] for i in self.layer_ids], dim=-1), out.last_hidden_state

    def commit(self, cache: TargetCache, keep: torch.Tensor) -> None:
        """Mark which of the last forward's W slots stay in each sequence, then drop the others."""
        width = keep.shape[1]
        cache.valid[:, -width:] = keep
        index, valid = compaction_index(cache.valid)
        for layer in cache.kv.layers:
            layer.keys = gather_slots(layer.keys, index)
            layer.values = gather_slots(layer.values, index)
        cache.positions = torch.gather(cache.positions, 1, index)
        cache.valid = valid
