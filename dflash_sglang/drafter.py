"""Reference DFlash drafter in plain torch (the spec every fast path is checked against).

Per draft layer, queries come only from the block `[anchor, MASK x (B-1)]`; keys/values are the context rows
(target features fused by `fc` + `hidden_norm`, projected by the layer's own k/v weights, never through its
input norm) followed by the block rows. Full layers see the whole block (bidirectional); sliding layers are
causal in the block unless the config says otherwise, and windowed on everything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dflash_sglang.config import DFlashConfig, RopeConfig, yarn_mscale


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm (`w * x_hat`), or Gemma's (`(1 + w) * x_hat`) for drafters that set `use_gemma_norm`."""

    def __init__(self, dim: int, eps: float, gemma: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if gemma else torch.ones(dim))
        self.eps = eps
        self.gemma = gemma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = 1.0 + self.weight.float() if self.gemma else self.weight.float()
        return (normed * scale).to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (neox layout, full head_dim) and the cos/sin scale of the drafter's own RoPE."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    pos_freqs = rope.theta ** exponents
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    if rope.rope_type == "linear":
        return 1.0 / (rope.factor * pos_freqs), 1.0
    # YaRN: interpolate low frequencies, keep high ones, blend with a linear ramp between the correction dims.
    original = rope.original_max_position_embeddings or max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp
    inv = (1.0 / (rope.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    scale = rope.attention_factor if rope.attention_factor is not None else yarn_mscale(rope.factor)
    return inv, float(scale)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, scale: float) -> torch.Tensor:
    """x: [..., T, heads, d]; positions: [..., T]."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    cos = (angles.cos() * scale).to(x.dtype)[..., None, :]
    sin = (angles.sin() * scale).to(x.dtype)[..., None, :]
    cos = torch.cat([cos, cos], dim=-1)
    sin = torch.cat([sin, sin], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class ContextCache:
    """Per-layer context K/V of committed tokens, one padded row per request.

    keys/values: [bs, kv_heads, C, d] per layer; positions/valid: [bs, C]. Rows append in steps of equal
    width with a validity mask; `compact` drops invalid columns so the cache stays O(committed tokens).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, cfg: DFlashConfig, batch: int, device, dtype) -> ContextCache:
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        return cls(
            keys=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            values=[torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)],
            positions=torch.empty(batch, 0, dtype=torch.long, device=device),
            valid=torch.empty(batch, 0, dtype=torch.bool, device=device),
        )

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.keys = [torch.cat([a, b], dim=2) for a, b in zip(self.keys, keys)]
        self.values = [torch.cat([a, b], dim=2) for a, b in zip(self.values, values)]
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.valid = torch.cat([self.valid, valid], dim=1)
        self.compact()

    def compact(self) -> None:
        index, valid = compaction_index(self.valid)
        if index.shape[1] == self.valid.shape[1]:
            return
        self.keys = [gather_slots(k, index) for k in self.keys]
        self.values = [gather_slots(v, index) for v in self.values]
        self.positions = torch.gather(self.positions, 1, index)
        self.valid = valid

    def select(self, rows: torch.Tensor) -> ContextCache:
        return ContextCache([k[rows] for k in self.keys], [v[rows] for v in self.values], self.positions[rows], self.valid[rows])


def compaction_index(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column order that moves each row's valid slots to the front (stable); and the new validity mask."""
    width = int(valid.sum(1).max()) if valid.numel() else 0
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.gather(valid, 1, order)


def gather_slots(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cache: [bs, heads, S, d]; index: [bs, S'] -> [bs, heads, S', d]."""
    idx = index[:, None, :, None].expand(-1, cache.shape[1], -1, cache.shape[3])
    return torch.gather(cache, 2, idx)


def block_attention_mask(
    cache: ContextCache, block_positions: torch.Tensor, causal: bool, window: int | None
) -> torch.Tensor:
    """[bs, B, C + B] bool (True = visible) for one layer."""
    q = block_positions[:, :, None]
    ctx = cache.valid[:, None, :].expand(-1, q.shape[1], -1)
    if window is not None:
        ctx = ctx & (q - cache.positions[:, None, :] < window)
    k = block_positions[:, None, :]
    blk = torch.ones_like(q - k, dtype=torch.bool)
    if causal:
        blk = k <= q
    if window is not None:
        blk = blk & ((q - k).abs() < window)
    return torch.cat([ctx, blk], dim=2)


class DrafterAttention(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.use_gemma_norm)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, cfg.use_gemma_norm)

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor, rope: tuple[torch.Tensor, float]):
        """x: [bs, T, H] -> k, v: [bs, kv_heads, T, d] (k normed and rotated)."""
        bs, t, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(bs, t, self.num_kv_heads, self.head_dim))
        k = apply_rope(k, positions, *rope)
        v = self.v_proj(x).view(bs, t, self.num_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, positions, rope, ctx_k, ctx_v, mask):
        bs, b, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(bs, b, self.num_heads, self.head_dim))
        q = apply_rope(q, positions, *rope).transpose(1, 2)
        k_blk, v_blk = self.project_kv(x, positions, rope)
        k = torch.cat([ctx_k, k_blk], dim=2)
        v = torch.cat([ctx_v, v_blk], dim=2)
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :, :])
        return self.o_proj(out.transpose(1, 2).reshape(bs, b, -1))


class DrafterMLP(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DrafterLayer(nn.Module):
    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.use_gemma_norm)
        self.self_attn = DrafterAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.use_gemma_norm)
        self.mlp = DrafterMLP(cfg)


class DFlashDrafter(nn.Module):
    """Drafter stack without embedding or head: those are the target's (passed in by the caller)."""

    def __init__(self, cfg: DFlashConfig):
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.num_target_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.use_gemma_norm)
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.use_gemma_norm)
        inv_freq, scale = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = scale

    @property
    def rope(self) -> tuple[torch.Tensor, float]:
        return self.inv_freq, self.rope_scale

    def context_kv(self, features: torch.Tensor, positions: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Target features [bs, T, K*H] at `positions` -> per-layer context K/V [bs, kv_heads, T, d]."""
        ctx = self.hidden_norm(self.fc(features))
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.self_attn.project_kv(ctx, positions, self.rope)
            keys.append(k)
            values.append(v)
        return keys, values

    def forward(self, block_embeds: torch.Tensor, block_positions: torch.Tensor, cache: ContextCache) -> torch.Tensor:
        """block_embeds [bs, B, H] (scaled target embeddings), positions [bs, B] -> final-normed hidden [bs, B, H]."""
        x = block_embeds
        for i, layer in enumerate(self.layers):
            mask = block_attention_mask(cache, block_positions, self.cfg.is_layer_causal(i), self.cfg.layer_window(i))
            h = layer.input_layernorm(x)
            x = x + layer.self_attn(h, block_positions, self.rope, cache.keys[i], cache.values[i], mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.norm(x)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module, softcap: float | None) -> torch.Tensor:
        """Target head on drafter states, with the drafter's output multiplier and softcap."""
        logits = lm_head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.cfg.output_multiplier
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits
