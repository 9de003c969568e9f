"""DFlash drafter training: frozen target, online target features, random anchor blocks packed per sequence.

One optimizer micro-step on a batch of sequences:
1. the frozen target runs once over each (padded) sequence; the hooks of `TargetModel` capture the features of
   `target_layer_ids` for every token (computed online; on a GPU kept in device memory for later epochs, see
   `TargetOutputCache`);
2. per sequence, up to `num_anchors` anchor positions `a` are drawn among the answer tokens (fresh every time a
   sequence is seen); each gives a block `[x_a, MASK x (B-1)]` at positions `a .. a+B-1`;
3. all blocks of a sequence go through the drafter in ONE forward: queries = every block row, keys = the context
   rows of all tokens (visible iff key position < anchor, windowed on sliding layers) + the query's own block
   (bidirectional on full layers, causal on sliding ones unless configured), nothing of other blocks. The layer
   modules are the reference drafter's, so training computes exactly what inference runs;
4. block row k (1..B-1) predicts x_{a+k}: cross-entropy weighted by exp(-(k-1)/gamma) (early rows matter most:
   a draft is only useful up to its first miss), normalized by the weight sum; rows past the sequence end or
   outside the loss mask weigh 0. The label is x_{a+k}, or with `soft_labels` = s, (1 - s) x_{a+k} + s times the
   target's own distribution for that token (its head at position a+k-1, from the same forward as the features):
   the answers are the target's greedy tokens, so both agree on the argmax, and the distribution carries what the
   target thinks of every other token.
The target's embedding and LM head are the drafter's too, frozen. Trained: `fc`, `hidden_norm`, the draft
layers, `norm`.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dflash_sglang.config import (FULL_ATTENTION, DFlashConfig, TargetInfo, check_pair, default_softcap,
                                  parse_drafter_config)
from dflash_sglang.drafter import DFlashDrafter
from dflash_sglang.engine import DFlashEngine
from dflash_sglang.kernels.soft_ce import soft_cross_entropy_rows
from dflash_sglang.loader import save_drafter
from dflash_sglang.prompts import parse_jsonl
from dflash_sglang.target import TargetModel
from dflash_sglang.tiny import tiny_target_layer_ids

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Loss decay per block size: 7 for B=16 and 4 for B=8 are what public DFlash recipes use; 5 for B=10 is the paper's
# value as our notes recall it (unverified). Other block sizes use the line through the B=8 and B=16 values.
KNOWN_GAMMAS = {16: 7.0, 10: 5.0, 8: 4.0}


def default_gamma(block_size: int) -> float:
    return KNOWN_GAMMAS.get(block_size, 1.0 + 3.0 * block_size / 8.0)


@dataclass
class TrainConfig:
    target: str
    data: str
    out: str
    drafter_config: str | None = None  # config.json whose architecture to train; default: derived from the target
    num_draft_layers: int = 5
    init_from_target: bool = False  # draft layers start as copies of the target's last layers (see copy_target_layers)
    num_target_features: int | None = None  # default: num_draft_layers
    block_size: int = 16
    mask_token_id: int | None = None  # default: the tokenizer's mask token, else the first unused embedding row
    num_anchors: int = 512
    gamma: float | None = None  # default: default_gamma(block_size)
    soft_labels: float = 0.0  # weight of the target's own next-token distribution in each row's label (see loss)
    epochs: int = 6
    max_steps: int | None = None  # default: epochs over the data
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1
    max_seq_len: int = 3072
    lr: float = 6e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.04
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # target weights and autocast dtype; drafter master weights stay float32
    save_dtype: str = "bfloat16"
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    eval_every: int = 0  # steps between acceptance estimates; 0: only at the end
    eval_prompts: str | None = None  # JSON list of token-id lists; default: prompts of the last records, held out
    num_eval_prompts: int = 8
    eval_max_new_tokens: int = 64
    loss_chunk_rows: int = 8192  # rows of logits materialized at once in the loss
    resume: bool = False
    stop_after: int | None = None  # leave after this step (checkpoint written), e.g. for preemptible jobs
    max_minutes: float | None = None  # this session's wall-clock cap; the final estimate and export come after it
    target_cache_gb: float | None = None  # memory for the target's outputs across epochs (TargetOutputCache)
    progress: bool = True


@dataclass
class Sequence:
    ids: torch.Tensor  # [S] int32 (compact: datasets of many long sequences stay in memory)
    loss_mask: torch.Tensor  # [S] bool

    @property
    def prompt(self) -> list[int]:
        """Tokens before the first answer token (what the target was asked)."""
        answer = self.loss_mask.nonzero()
        first = int(answer[0]) if len(answer) else len(self.ids)
        return self.ids[:first].tolist()


def load_sequences(path: str | Path, max_seq_len: int) -> list[Sequence]:
    """JSONL records: `{"prompt_ids", "output_ids"}` (what `regenerate` writes; loss on the output) or
    `{"input_ids", "loss_mask"}` (multi-turn data: loss where the mask is 1). Truncated to `max_seq_len`."""
    sequences = []
    for n, row in enumerate(parse_jsonl(Path(path).read_text())):
        if "output_ids" in row:
            ids = list(row["prompt_ids"]) + list(row["output_ids"])
            mask = [False] * len(row["prompt_ids"]) + [True] * len(row["output_ids"])
        elif "input_ids" in row and "loss_mask" in row:
            ids, mask = list(row["input_ids"]), [bool(m) for m in row["loss_mask"]]
        else:
            raise ValueError(f"{path}:{n + 1}: a record needs `prompt_ids` + `output_ids` or `input_ids` + `loss_mask`")
        if len(ids) != len(mask):
            raise ValueError(f"{path}:{n + 1}: `loss_mask` has {len(mask)} entries for {len(ids)} tokens")
        sequences.append(Sequence(torch.tensor(ids[:max_seq_len], dtype=torch.int32),
                                  torch.tensor(mask[:max_seq_len], dtype=torch.bool)))
    if not sequences:
        raise ValueError(f"{path} has no training records")
    return sequences


# ----------------------------------------------------------------------------------------------------------
# Anchors, masks, targets


def valid_anchor_mask(loss_mask: torch.Tensor) -> torch.Tensor:
    """[bs, S] bool: positions that can anchor a block — an answer token followed by an answer token (the anchor
    is always a generated token at inference, and the block must have at least one target)."""
    following = torch.zeros_like(loss_mask)
    following[:, :-1] = loss_mask[:, 1:]
    return loss_mask & following


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def sample_anchors(loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator,
                   multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_anchors` distinct anchors per row, uniform over the valid ones, sorted.

    Returns anchors [bs, N] and anchor_valid [bs, N]; N = the largest count any row got, rounded up to a multiple
    of `multiple` (rows with fewer valid positions are padded with anchor 0, invalid).
    """
    candidates = valid_anchor_mask(loss_mask)
    picked = []
    for row in candidates.cpu():
        positions = row.nonzero().flatten()
        choice = torch.randperm(len(positions), generator=generator)[:num_anchors]
        picked.append(positions[choice].sort().values)
    width = round_up(max(1, max(len(p) for p in picked)), multiple)
    anchors = torch.zeros(len(picked), width, dtype=torch.long)
    valid = torch.zeros(len(picked), width, dtype=torch.bool)
    for b, p in enumerate(picked):
        anchors[b, : len(p)] = p
        valid[b, : len(p)] = True
    return anchors.to(loss_mask.device), valid.to(loss_mask.device)


def packed_block_mask(anchors: torch.Tensor, anchor_valid: torch.Tensor, context_valid: torch.Tensor, block_size: int,
                      causal: bool, window: int | None) -> torch.Tensor:
    """[bs, N*B, S + N*B] bool (True = visible): N packed blocks against S context rows and all blocks.

    Query (n, j) sits at position a_n + j. Context key s (position s) is visible iff it is a real token, s < a_n
    (the anchor's own feature does not exist yet at inference) and, on sliding layers, a_n + j - s < window.
    Block key (m, i) is visible iff m == n, i <= j when causal, and |i - j| < window on sliding layers. Blocks of
    invalid anchors see only their own block (never an empty row, which would give NaN), and weigh 0 in the loss.
    """
    bs, n = anchors.shape
    s = context_valid.shape[1]
    dev = anchors.device
    depth = torch.arange(block_size, device=dev)
    q_pos = (anchors[:, :, None] + depth).reshape(bs, n * block_size)
    q_anchor = anchors.repeat_interleave(block_size, dim=1)
    k_pos = torch.arange(s, device=dev)
    ctx = context_valid[:, None, :] & (k_pos[None, None, :] < q_anchor[:, :, None])
    ctx = ctx & anchor_valid.repeat_interleave(block_size, dim=1)[:, :, None]
    if window is not None:
        ctx = ctx & (q_pos[:, :, None] - k_pos[None, None, :] < window)
    own = torch.ones(block_size, block_size, dtype=torch.bool, device=dev)
    if causal:
        own = own.tril()
    if window is not None:
        own = own & ((depth[:, None] - depth[None, :]).abs() < window)
    block_of = torch.arange(n, device=dev).repeat_interleave(block_size)
    depth_of = depth.repeat(n)
    blocks = (block_of[:, None] == block_of[None, :]) & own[depth_of[:, None], depth_of[None, :]]
    return torch.cat([ctx, blocks[None].expand(bs, -1, -1)], dim=2)


# Rows weighing less than this fraction of row 1 are left out of the loss: each costs the head as much as any
# other row, and together they carry a negligible share of it (gamma 1.5, B = 16: rows 12-15, 27% of the head's
# rows and 0.06% of the weight; at the published gamma 7 no row is this light).
MIN_ROW_WEIGHT = 1e-3


def loss_weights(block_size: int, gamma: float) -> torch.Tensor:
    """[B] weight of each block row: 0 for the anchor row, exp(-(k-1)/gamma) for row k >= 1, and 0 where that is
    below `MIN_ROW_WEIGHT`."""
    k = torch.arange(block_size, dtype=torch.float32)
    weights = torch.exp(-(k - 1) / gamma)
    weights[0] = 0.0
    weights[weights < MIN_ROW_WEIGHT] = 0.0
    return weights


def block_targets(ids: torch.Tensor, loss_mask: torch.Tensor, anchors: torch.Tensor, anchor_valid: torch.Tensor,
                  weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row k of the block at anchor a predicts x_{a+k}. Returns targets and their weights, [bs, N, B] each;
    rows past the sequence, outside the loss mask or in invalid blocks weigh 0."""
    seq_len = ids.shape[1]
    block_size = weights.shape[0]
    where = anchors[:, :, None] + torch.arange(block_size, device=ids.device)
    inside = where < seq_len
    flat = where.clamp(max=seq_len - 1).flatten(1)
    targets = torch.gather(ids, 1, flat).view_as(where)
    in_loss = torch.gather(loss_mask, 1, flat).view_as(where) & inside & anchor_valid[:, :, None]
    return targets, weights.to(ids.device) * in_loss


# ----------------------------------------------------------------------------------------------------------
# Forward and loss


def packed_drafter_forward(drafter: DFlashDrafter, block_embeds: torch.Tensor, block_positions: torch.Tensor,
                           context_keys: list[torch.Tensor], context_values: list[torch.Tensor],
                           masks: list[torch.Tensor]) -> torch.Tensor:
    """The reference drafter's layer stack over packed blocks: block_embeds [bs, N*B, H], one mask per layer
    [bs, N*B, S+N*B] -> final-normed hidden [bs, N*B, H] (the same per-layer computation as
    `DFlashDrafter.forward`, with the packed mask in place of the single-block one)."""
    x = block_embeds
    for i, layer in enumerate(drafter.layers):
        h = layer.input_layernorm(x)
        x = x + layer.self_attn(h, block_positions, drafter.rope, context_keys[i], context_values[i], masks[i])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return drafter.norm(x)


def head_logits(rows: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """float32 logits rows @ head.T; on CUDA a half-precision matmul writes them in float32 directly (one pass over
    the vocab-sized result instead of a half-precision write and a float copy)."""
    if rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(rows, head.T, out_dtype=torch.float32)
    return (rows @ head.T).float()


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(head(h_i), y_i) over rows h [R, H], with the gradient wrt h computed in the forward pass.

    y_i is the one-hot label t_i, or with `soft` > 0 and teacher rows g [R, H] (the target's final hidden states),
    (1 - soft) * onehot(t_i) + soft * softmax(head(g_i)) (the target's softcap applied to its own logits).

    The head is frozen, so the only gradient is dL/dh_i = w_i * multiplier * ((softmax - y_i) * softcap') @ W,
    which the forward can finish chunk by chunk while each chunk's logits exist. For a small target's drafter the
    head is most of a training step (49k-row vocab, 30k rows per step) and its cost is the passes over the
    vocab-sized chunk, so each pass counts: logits are written once in float32 and the per-row loss and logit
    gradient come from `soft_cross_entropy_rows` (one Triton kernel on CUDA, in place torch elsewhere); the per-row
    factor w * multiplier is applied after the matmul back to H (it is linear), not over the vocab. Logits are
    computed in `compute_dtype` and reduced in float32, as autocast's head would.
    """

    @staticmethod
    def forward(ctx, rows, weight, targets, weights, multiplier, softcap, chunk_rows, compute_dtype, teacher=None,
                soft=0.0, teacher_softcap=None):
        head = weight.detach().to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows) if need_grad else None
        with torch.autocast(rows.device.type, enabled=False):
            for lo in range(0, rows.shape[0], chunk_rows):
                hi = min(lo + chunk_rows, rows.shape[0])
                logits = capped_logits(rows[lo:hi].detach().to(compute_dtype), head, multiplier, softcap)
                teacher_logits = None
                if soft:
                    teacher_logits = capped_logits(teacher[lo:hi].to(compute_dtype), head, 1.0, teacher_softcap)
                w = weights[lo:hi].float()
                loss, dlogits = soft_cross_entropy_rows(logits, teacher_logits, targets[lo:hi], soft, softcap,
                                                        compute_dtype, need_grad)
                total += (loss * w).sum()
                if need_grad:
                    rows_grad = dlogits @ head
                    grad[lo:hi] = (rows_grad.float() * (w * multiplier)[:, None]).to(rows.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None, None, None, None, None


def capped_logits(rows: torch.Tensor, head: torch.Tensor, multiplier: float, softcap: float | None) -> torch.Tensor:
    """float32 softcap * tanh(multiplier * rows @ head.T / softcap) (no cap without a softcap), in place."""
    logits = head_logits(rows, head)
    if multiplier != 1.0:
        logits.mul_(multiplier)
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def weighted_cross_entropy(hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, drafter: DFlashDrafter,
                           lm_head: torch.nn.Module, softcap: float | None, chunk_rows: int,
                           teacher: torch.Tensor | None = None, soft: float = 0.0,
                           teacher_softcap: float | None = None) -> torch.Tensor:
    """sum(w * CE) / sum(w) over rows with w > 0, through `HeadCrossEntropy`: at most `chunk_rows` x vocab
    logits exist at once (for a 150k vocab they would dwarf everything else). The head must be bias-free, as every
    LM head DFlash targets have. `targets` and `weights` may live on the host (as `batch_loss` passes them): the rows
    to keep are then found there, without a device sync. With `soft` > 0, `teacher` [..., H] holds the target's
    final hidden state for every row (shaped like `hidden`): the labels mix in its distribution (HeadCrossEntropy)."""
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("training needs a target LM head without bias")
    keep = (weights.flatten() > 0).nonzero().flatten()
    targets, weights, keep = to_device([targets.flatten()[keep], weights.flatten()[keep], keep], hidden.device)
    rows = hidden.flatten(0, -2).index_select(0, keep)
    teacher_rows = teacher.flatten(0, -2).index_select(0, keep) if soft else None
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else rows.dtype
    total = HeadCrossEntropy.apply(rows, lm_head.weight, targets, weights, float(drafter.cfg.output_multiplier),
                                   softcap, chunk_rows, compute_dtype, teacher_rows, float(soft), teacher_softcap)
    return total / weights.sum().clamp(min=1e-6)


# Batches pad to a multiple of this many tokens: length-bucketed batches otherwise bring a new tensor shape nearly
# every step. (The first run with them, 2026-11-29 on the H200, spent its first minute at a third of its later
# speed; new shapes for the caching allocator are the likely cause, not yet confirmed.)
PAD_MULTIPLE = 64


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors to `device`; to a GPU through pinned memory without blocking, so the host goes on queuing work
    instead of waiting for the GPU to reach the copy (a step's Python, ~30 layers of it, then overlaps the GPU)."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    return [t.to(device) if t.is_cuda else t.pin_memory().to(device, non_blocking=True) for t in tensors]


def pad_batch(sequences: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host tensors ids [bs, S] (right-padded with 0 to a multiple of PAD_MULTIPLE), loss_mask [bs, S], real
    [bs, S]."""
    width = round_up(max(len(s.ids) for s in sequences), PAD_MULTIPLE)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    loss_mask = torch.zeros(len(sequences), width, dtype=torch.bool)
    real = torch.zeros(len(sequences), width, dtype=torch.bool)
    for b, s in enumerate(sequences):
        ids[b, : len(s.ids)] = s.ids
        loss_mask[b, : len(s.ids)] = s.loss_mask
        real[b, : len(s.ids)] = True
    return ids, loss_mask, real


# Blocks per attention group: the packed attention gives each query the context keys plus the keys of every block in
# its group, all but its own masked out, so one group of all N blocks (the plain layout) spends most of its work on
# masked keys (2,048 block keys vs a few hundred context keys at 128 anchors). Groups of 8 blocks see the context
# (repeated per group) and 128 block keys.
ANCHORS_PER_GROUP = 8


def attention_backends(device: torch.device) -> list:
    """SDPA backends for the packed drafter forward on `device`. On CUDA not cuDNN's, which builds an execution plan
    per new shape (length-bucketed batches bring a new one nearly every step; on the H200 that cost more than the
    attention itself); the memory-efficient kernel takes the boolean mask as it is."""
    if device.type == "cuda":
        return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


class TargetOutputCache:
    """The frozen target's outputs for each training sequence (its fused features, and its final hidden states when
    soft labels need them), kept on the device after the sequence's first forward so that later epochs skip the
    target, which is ~40 of a step's ~110 ms at SmolLM2's shape. Holds at most `budget_bytes`; a sequence that
    does not fit is recomputed whenever it comes."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def lookup(self, keys: list[int], width: int,
               with_final: bool) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Right-padded (with zeros) [bs, width, .] features and final hidden states (None unless `with_final`),
        or None unless every sequence is cached."""
        if not keys or any(k not in self.entries or (with_final and self.entries[k][1] is None) for k in keys):
            return None
        first_features, first_final = self.entries[keys[0]]
        features = first_features.new_zeros((len(keys), width, first_features.shape[-1]))
        final = first_final.new_zeros((len(keys), width, first_final.shape[-1])) if with_final else None
        for b, key in enumerate(keys):
            row_features, row_final = self.entries[key]
            features[b, : len(row_features)] = row_features
            if final is not None:
                final[b, : len(row_final)] = row_final
        return features, final

    def store(self, keys: list[int], lengths: list[int], features: torch.Tensor,
              final_hidden: torch.Tensor | None) -> None:
        """Keep row b's first lengths[b] positions of a batch's outputs, while the budget allows."""
        for b, (key, length) in enumerate(zip(keys, lengths, strict=True)):
            if key in self.entries:
                continue
            parts = (features[b, :length], None if final_hidden is None else final_hidden[b, :length])
            size = sum(t.numel() * t.element_size() for t in parts if t is not None)
            if self.used_bytes + size > self.budget_bytes:
                continue
            self.entries[key] = tuple(None if t is None else t.clone() for t in parts)
            self.used_bytes += size


def target_cache_budget(requested_gb: float | None, device: torch.device) -> int:
    """Bytes for `TargetOutputCache`: the request, else on CUDA half of the memory still free (the step's own
    peak at SmolLM2's shape is a few GB), else nothing (on CPU the forward is cheap next to everything else)."""
    if requested_gb is not None:
        if requested_gb < 0:
            raise ValueError(f"--target-cache-gb must be >= 0 (0 turns the cache off), got {requested_gb}")
        return int(requested_gb * 2**30)
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return free // 2


def batch_loss(drafter: DFlashDrafter, target: TargetModel, softcap: float | None, sequences: list[Sequence],
               num_anchors: int, weights: torch.Tensor, generator: torch.Generator, chunk_rows: int,
               autocast_dtype: torch.dtype | None, soft_labels: float = 0.0, cache: TargetOutputCache | None = None,
               cache_keys: list[int] | None = None) -> torch.Tensor:
    """The weighted block loss of one micro-batch (steps 1-4 of the module docstring). Anchors, block ids and
    targets are drawn on the host from the host batch, so nothing in the step waits for the device. With a
    `cache`, `cache_keys` name the sequences (their index in the training set) whose target outputs it keeps."""
    cfg = drafter.cfg
    dev = target.device
    ids, loss_mask, real = pad_batch(sequences)
    anchors, anchor_valid = sample_anchors(loss_mask, num_anchors, generator, ANCHORS_PER_GROUP)
    targets, row_weights = block_targets(ids, loss_mask, anchors, anchor_valid, weights)
    bs, n = anchors.shape
    groups = n // ANCHORS_PER_GROUP
    block_size = weights.shape[0]
    block_ids = torch.full((bs, n, block_size), cfg.mask_token_id, dtype=torch.long)
    block_ids[:, :, 0] = torch.gather(ids, 1, anchors)
    ids, real, anchors, anchor_valid, block_ids = to_device([ids, real, anchors, anchor_valid, block_ids], dev)
    cached = cache.lookup(cache_keys, ids.shape[1], bool(soft_labels)) if cache is not None else None
    if cached is not None:
        features, final_hidden = cached
    else:
        features, final_hidden = target.causal_forward(ids)
        if cache is not None:
            cache.store(cache_keys, [len(s.ids) for s in sequences], features, final_hidden if soft_labels else None)
    teacher = None
    if soft_labels:
        # Row k of the block at a is labelled by the target's output at position a+k-1 (row 0 weighs 0; rows past
        # the padded width weigh 0 too, and read the last position instead).
        before = (anchors[:, :, None] + torch.arange(block_size, device=dev) - 1).clamp(0, ids.shape[1] - 1)
        before = before.flatten(1)
        teacher = torch.gather(final_hidden, 1, before[:, :, None].expand(-1, -1, final_hidden.shape[-1]))
    # Group g of row b is a row of its own from here to the loss: its blocks, the context of row b (repeated), and
    # masks built for its anchors alone. Rows stay in (b, anchor, depth) order, the order of the targets.
    group_anchors = anchors.view(bs * groups, ANCHORS_PER_GROUP)
    group_valid = anchor_valid.view(bs * groups, ANCHORS_PER_GROUP)
    group_context = real.repeat_interleave(groups, dim=0)
    block_positions = (group_anchors[:, :, None] + torch.arange(block_size, device=dev)).flatten(1)
    with torch.no_grad():
        block_embeds = target.embed(block_ids.view(bs * groups, -1)) * cfg.input_embedding_scale
    masks_by_kind: dict[tuple[bool, int | None], torch.Tensor] = {}
    masks = []
    for i in range(cfg.num_hidden_layers):
        kind = (cfg.is_layer_causal(i), cfg.layer_window(i))
        if kind not in masks_by_kind:
            masks_by_kind[kind] = packed_block_mask(group_anchors, group_valid, group_context, block_size, *kind)
        masks.append(masks_by_kind[kind])
    context_positions = torch.arange(ids.shape[1], device=dev).expand(bs, -1)
    with torch.autocast(dev.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        keys, values = drafter.context_kv(features, context_positions)
        keys = [k.repeat_interleave(groups, dim=0) for k in keys]
        values = [v.repeat_interleave(groups, dim=0) for v in values]
        with sdpa_kernel(attention_backends(dev)):
            hidden = packed_drafter_forward(drafter, block_embeds, block_positions, keys, values, masks)
        return weighted_cross_entropy(hidden, targets, row_weights, drafter, target.lm_head, softcap, chunk_rows,
                                      teacher, soft_labels, target.softcap)


# ----------------------------------------------------------------------------------------------------------
# Drafter construction and output


def default_mask_token_id(target_path: str | Path, vocab_size: int) -> int:
    """The tokenizer's mask token if it has one, else the first embedding row past the tokenizer (unused padding,
    as Qwen3's 151669); targets whose vocabulary fills the table need --mask-token-id."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(target_path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{target_path}: no tokenizer to pick a mask token from ({e}); pass --mask-token-id") from e
    if tok.mask_token_id is not None:
        return int(tok.mask_token_id)
    if len(tok) < vocab_size:
        return len(tok)
    raise ValueError(f"{target_path}: the tokenizer has no mask token and uses all {vocab_size} embedding rows; "
                     f"pass --mask-token-id with a token the target never emits in your data")


def drafter_config_for_target(tc, num_draft_layers: int, target_layer_ids: list[int], block_size: int,
                              mask_token_id: int) -> dict:
    """z-lab `DFlashDraftModel` config.json whose layers have the shape of the target's (text config `tc`), as in
    every published drafter: the target's hidden size, heads, head_dim and MLP width."""
    heads = tc.num_attention_heads
    rope = getattr(tc, "rope_parameters", None) or {}
    return {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3",
        "hidden_size": tc.hidden_size,
        "intermediate_size": tc.intermediate_size,
        "num_hidden_layers": num_draft_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(tc, "num_key_value_heads", None) or heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // heads,
        "hidden_act": "silu",
        "rms_norm_eps": getattr(tc, "rms_norm_eps", 1e-6),
        "rope_theta": float(rope.get("rope_theta", getattr(tc, "rope_theta", 1_000_000.0))),
        "rope_scaling": None,
        "max_position_embeddings": tc.max_position_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": [FULL_ATTENTION] * num_draft_layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "vocab_size": tc.vocab_size,
        "block_size": block_size,
        "num_target_layers": tc.num_hidden_layers,
        "dflash_config": {"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids)},
    }


def build_drafter_config(cfg: TrainConfig) -> dict:
    """The drafter's config.json: `--drafter-config`'s architecture (block size and, if given, mask token from the
    training settings), else derived from the target."""
    from transformers import AutoConfig

    if cfg.drafter_config is not None:
        raw = json.loads(Path(cfg.drafter_config).read_text())
        raw["block_size"] = cfg.block_size
        raw.get("dflash_config", {}).pop("block_size", None)
        if cfg.mask_token_id is not None:
            raw.setdefault("dflash_config", {})["mask_token_id"] = cfg.mask_token_id
    else:
        tc = AutoConfig.from_pretrained(cfg.target).get_text_config(decoder=True)
        ids = tiny_target_layer_ids(tc.num_hidden_layers, cfg.num_target_features or cfg.num_draft_layers)
        mask = cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token_id(cfg.target, tc.vocab_size)
        raw = drafter_config_for_target(tc, cfg.num_draft_layers, ids, cfg.block_size, mask)
    raw["dtype"] = cfg.save_dtype
    return raw


def init_drafter(draft_cfg: DFlashConfig, seed: int, std: float) -> DFlashDrafter:
    """Fresh drafter: linear weights ~ N(0, std) (the target's initializer_range), norms at 1."""
    torch.manual_seed(seed)
    drafter = DFlashDrafter(draft_cfg)
    for param in drafter.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=std)
    return drafter


# Targets whose decoder layers use the drafter's own conventions (plain `w * x_hat` RMSNorm, Qwen3/Llama naming),
# so a target layer's weights mean the same thing inside a draft layer.
LAYER_COMPATIBLE_TARGETS = ("qwen3", "qwen2", "llama", "mistral")


def copy_target_layers(drafter: DFlashDrafter, target: TargetModel) -> list[str]:
    """Start draft layer i as target layer L-n+i and the final norm as the target's (the head was trained on its
    output). Tensors the target layer lacks (e.g. Llama has no q_norm/k_norm) keep their fresh init; their names
    are returned. The draft layers then begin as attention and MLP blocks that already work on this target's
    embedding space, which a small drafter on a small budget learns from much faster than from noise."""
    model_type = target.text_config.model_type
    if model_type not in LAYER_COMPATIBLE_TARGETS:
        raise ValueError(f"--init-from-target supports {LAYER_COMPATIBLE_TARGETS} targets, not {model_type!r}")
    first = len(target.layers) - len(drafter.layers)
    if first < 0:
        raise ValueError(f"--init-from-target needs at most {len(target.layers)} draft layers (the target's count)")
    kept = []
    with torch.no_grad():
        for i, layer in enumerate(drafter.layers):
            source = dict(target.layers[first + i].named_parameters())
            for name, param in layer.named_parameters():
                if name in source and source[name].shape == param.shape:
                    param.copy_(source[name])
                else:
                    kept.append(f"layers.{i}.{name}")
        drafter.norm.weight.copy_(target.model.get_decoder().norm.weight)
    return kept


def export_drafter(path: str | Path, raw_config: dict, drafter: DFlashDrafter, dtype: torch.dtype) -> None:
    save_drafter(path, raw_config, {k: v.to(dtype) for k, v in drafter.state_dict().items()})


# ----------------------------------------------------------------------------------------------------------
# Acceptance estimate


def estimate_acceptance(target: TargetModel, drafter: DFlashDrafter, softcap: float | None,
                        prompts: list[list[int]], max_new_tokens: int) -> float:
    """Mean acceptance length of the real engine's greedy chain on `prompts` (drafter cast to the target dtype,
    as it will be served)."""
    served = copy.deepcopy(drafter).to(target.dtype).eval()
    # `.to(dtype)` also casts the RoPE frequencies; bf16 ones are off by up to 0.4%, i.e. a fraction of a radian
    # a few thousand positions in. Keep them exact, as a served drafter's RoPE is.
    served.inv_freq = drafter.inv_freq.clone()
    result = DFlashEngine(target, served, softcap).generate(prompts, max_new_tokens, mode="chain")
    return result.mean_acceptance


# ----------------------------------------------------------------------------------------------------------
# Schedule, checkpoints, loop


class WarmupCosine:
    """LR factor: linear warmup from 0, then cosine to 0 at `total` steps (a callable object, so LambdaLR saves it)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# Micro-batches whose sequences are drawn together and sorted by length (see epoch_order).
BUCKET_BATCHES = 32


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[int]:
    """The sequence order of an epoch, a function of (lengths, batch size, seed, epoch) only, so a resumed run
    sees the same order. Consecutive `batch_size` entries form a micro-batch of similar lengths: the sequences
    are shuffled, each window of BUCKET_BATCHES micro-batches is sorted by length and cut into micro-batches,
    and the micro-batches are shuffled (a short final one stays last). A batch pads to its longest sequence,
    and random batches of chat answers padded ~2x: the target forward and the drafter's context attention paid
    for the padding."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    shuffled = torch.randperm(len(lengths), generator=g).tolist()
    window = batch_size * BUCKET_BATCHES
    batches = []
    for lo in range(0, len(shuffled), window):
        part = sorted(shuffled[lo: lo + window], key=lengths.__getitem__)
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    tail = batches.pop() if len(batches[-1]) < batch_size else []
    return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]] + tail


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# Under --max-minutes, the cosine schedule is re-planned every PLAN_AFTER_STEPS steps (the first step, which pays
# for warm-up, is not timed) from the speed of the last PLAN_WINDOW_STEPS steps, so that it reaches its end when the
# time does. Once was not enough: on the H200 the first steps ran while another job shared the GPU, the plan came
# out at 199 steps, and the run ended in 97 of its 170 seconds. A 10-step window was too short: length-bucketed
# batches differ several-fold in cost, and plans swung between 1,800 and 2,750 steps (the learning rate with them).
PLAN_AFTER_STEPS = 10
PLAN_WINDOW_STEPS = 200


def plan_steps_in_time(step: int, seconds_per_step: float, seconds_left: float, total_steps: int) -> int:
    """Total steps of a schedule that must end within `seconds_left` from `step`: never more than planned, never
    fewer than the next step."""
    return max(step + 1, min(total_steps, step + int(seconds_left / max(seconds_per_step, 1e-9))))


# Settings a resumed run must share with the run that wrote the checkpoint (others, e.g. eval or stop_after,
# may change between sessions).
RESUME_INVARIANTS = ("target", "data", "block_size", "num_anchors", "gamma", "soft_labels", "epochs", "max_steps",
                     "batch_size", "grad_accum", "max_seq_len", "lr", "weight_decay", "warmup_ratio", "seed")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    acceptance: float | None
    seconds: float
    out: Path
    planned_steps: int = 0  # the schedule's length (re-planned under --max-minutes)
    stopped_by_time: bool = False
    cached_sequences: int = 0  # training sequences whose target outputs the cache held at the end
    cache_gb: float = 0.0


def train(cfg: TrainConfig) -> TrainResult:
    if not 0.0 <= cfg.soft_labels <= 1.0:
        raise ValueError(f"--soft-labels is a weight in [0, 1] (the target distribution's share of each label), "
                         f"got {cfg.soft_labels}")
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    target_dtype = DTYPES[cfg.dtype]
    autocast_dtype = torch.bfloat16 if target_dtype == torch.bfloat16 else None

    raw = build_drafter_config(cfg)
    draft_cfg = parse_drafter_config(raw)
    info = TargetInfo.from_path(cfg.target)
    check_pair(draft_cfg, info, cfg.block_size)
    target = TargetModel.load(cfg.target, draft_cfg.target_layer_ids, target_dtype, device)
    target.model.requires_grad_(False)
    softcap = default_softcap(draft_cfg, info)
    block_size = draft_cfg.block_size
    weights = loss_weights(block_size, cfg.gamma or default_gamma(block_size))

    sequences = load_sequences(cfg.data, cfg.max_seq_len)
    if cfg.eval_prompts is not None:
        eval_prompts = json.loads(Path(cfg.eval_prompts).read_text())[: cfg.num_eval_prompts]
    else:
        held = min(cfg.num_eval_prompts, len(sequences) - 1)
        eval_prompts = [s.prompt for s in sequences[len(sequences) - held:]]
        sequences = sequences[: len(sequences) - held]
    eval_prompts = [p for p in eval_prompts if p]

    std = getattr(target.text_config, "initializer_range", 0.02)
    drafter = init_drafter(draft_cfg, cfg.seed, std)
    if cfg.init_from_target:
        copy_target_layers(drafter, target)
    drafter = drafter.to(device).train()
    cache = TargetOutputCache(target_cache_budget(cfg.target_cache_gb, device))
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(sequences) / per_step)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(math.ceil(cfg.warmup_ratio * total_steps), total_steps))
    anchor_rng = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    checkpoint_path = out / CHECKPOINT_FILE
    if cfg.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        changed = [k for k in RESUME_INVARIANTS if state["train_config"].get(k) != getattr(cfg, k)]
        if changed:
            raise ValueError(f"{checkpoint_path} was written with different {changed}; resume with the same settings "
                             f"or start a new --out")
        drafter.load_state_dict(state["drafter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        anchor_rng.set_state(state["anchor_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]

    def write_checkpoint() -> None:
        _save_checkpoint(checkpoint_path, {
            "step": step, "drafter": drafter.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "anchor_rng": anchor_rng.get_state(),
            "torch_rng": torch.get_rng_state(), "train_config": asdict(cfg), "drafter_config": raw})

    def evaluate() -> float | None:
        if not eval_prompts:
            return None
        drafter.eval()
        acceptance = estimate_acceptance(target, drafter, softcap, eval_prompts, cfg.eval_max_new_tokens)
        drafter.train()
        return acceptance

    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    log = open(out / LOG_FILE, "a")
    loss_value, acceptance = float("nan"), None
    deadline = started + 60.0 * cfg.max_minutes if cfg.max_minutes is not None else None
    session_first, timed_out = step, False
    step_times: collections.deque[tuple[int, float]] = collections.deque(maxlen=PLAN_WINDOW_STEPS + 1)
    schedule_limit = total_steps  # a re-plan may shorten the schedule to fit the time, never lengthen it past this
    last = min(total_steps, cfg.stop_after) if cfg.stop_after is not None else total_steps
    lengths, ordered_epoch, epoch_sequences = [len(s.ids) for s in sequences], None, []
    while step < last:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch != ordered_epoch:
            ordered_epoch, epoch_sequences = epoch, epoch_order(lengths, cfg.batch_size, cfg.seed, epoch)
        order = epoch_sequences[index * per_step: (index + 1) * per_step]
        micro_batches = [order[lo: lo + cfg.batch_size] for lo in range(0, len(order), cfg.batch_size)]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for micro in micro_batches:
            loss = batch_loss(drafter, target, softcap, [sequences[i] for i in micro], cfg.num_anchors, weights,
                              anchor_rng, cfg.loss_chunk_rows, autocast_dtype, cfg.soft_labels, cache, micro)
            (loss / len(micro_batches)).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = loss_sum / len(micro_batches)
        record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
        if deadline is not None:
            now = time.perf_counter()
            step_times.append((step, now))
            if step > session_first + 1 and (step - session_first - 1) % PLAN_AFTER_STEPS == 0:
                oldest_step, oldest_time = step_times[0]
                speed = (now - oldest_time) / (step - oldest_step)
                planned = plan_steps_in_time(step, speed, deadline - now, schedule_limit)
                if planned != total_steps:
                    total_steps = planned
                    schedule = scheduler.lr_lambdas[0]
                    schedule.warmup, schedule.total = math.ceil(cfg.warmup_ratio * planned), planned
                    last = min(planned, cfg.stop_after) if cfg.stop_after is not None else planned
                    bar.total = planned
                record["planned_steps"] = total_steps
            timed_out = now >= deadline and step < last
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps or timed_out:
            acceptance = evaluate()
            record["acceptance"] = acceptance
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", accept="-" if acceptance is None else f"{acceptance:.2f}",
                        lr=f"{record['lr']:.1e}")
        if (cfg.save_every and step % cfg.save_every == 0) or step == last or timed_out:
            write_checkpoint()
        if timed_out:
            break
    bar.close()
    log.close()
    if step == total_steps or timed_out:
        export_drafter(out, raw, drafter, DTYPES[cfg.save_dtype])
    return TrainResult(step, loss_value, acceptance, time.perf_counter() - started, out, total_steps, timed_out,
                       len(cache.entries), cache.used_bytes / 2**30)
