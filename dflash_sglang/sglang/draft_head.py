"""Draft tokens from the target's LM head over the drafter's block states, vocab-parallel aware: the argmax (chain)
or the top-k with log-probabilities (tree mode).

The drafter has no head of its own; its logits are the target head's, times the drafter's `output_multiplier`,
then soft-capped (`cap * tanh(x / cap)`), as the reference drafter defines them. Under tensor parallelism each
rank holds a contiguous, ascending slice of the vocabulary: every rank takes its local max, the maxima and their
global ids are all-gathered, and the first rank holding the largest value wins, which is exactly a full-vocab
argmax (torch.argmax returns the first maximum, and lower ranks hold lower ids).

With `--speculative-dflash-draft-head-fp8` the head's rows are an FP8 copy (`Fp8HeadWeight`, one scale per vocab
row): a draft reads the whole head, 1.6 GB in bf16 at Qwen3-32B's shape (0.36 ms of a 1.9 ms draft on the H200),
and half that in FP8. Drafts only propose tokens and the target verifies every one, so the rounding can cost
acceptance, never correctness.
"""

from __future__ import annotations

import os

import torch

from dflash_sglang.sglang.env import env_flag

FP8_HEAD_ENV = "DFLASH_SGLANG_DRAFT_HEAD_FP8"
FP8_HEAD_FLAG = "--speculative-dflash-draft-head-fp8"


def fp8_head_from_env(environ=os.environ) -> bool:
    return env_flag(FP8_HEAD_ENV, environ)


class GreedyDraftHead:
    """Block rows 1..B-1 of the drafter's output -> drafted token ids.

    weight: the target head's local rows [rows, H] (padding rows past `num_rows` are skipped);
    vocab_start: global id of local row 0; tp_group: an SGLang GroupCoordinator when the head is
    vocab-parallel across more than one rank, else None.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        block_size: int,
        num_rows: int,
        vocab_start: int = 0,
        logit_multiplier: float = 1.0,
        softcap: float | None = None,
        tp_group=None,
    ):
        self.weight = weight
        self.block_size = block_size
        self.num_rows = num_rows
        self.vocab_start = vocab_start
        self.logit_multiplier = logit_multiplier
        self.softcap = softcap
        self.tp_group = tp_group
        self.graph_tokens: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [bs * B, H] -> drafted tokens [bs * (B - 1)] int64."""
        rows = self._draft_rows(hidden_states)
        local_max, local_ids = shard_argmax(rows, self.weight, self.logit_multiplier, self.softcap, self.num_rows)
        local_ids = local_ids + self.vocab_start
        if self.tp_group is None:
            return local_ids
        world = self.tp_group.world_size
        gathered_max = local_max.new_empty((world * local_max.shape[0],))
        gathered_ids = local_ids.new_empty((world * local_ids.shape[0],))
        self.tp_group.all_gather_into_tensor(gathered_max, local_max)
        self.tp_group.all_gather_into_tensor(gathered_ids, local_ids)
        return select_across_shards(gathered_max.view(world, -1), gathered_ids.view(world, -1))

    def allocate_graph_output(self, max_batch_size: int) -> None:
        """Static output of the CUDA-graph variant: replays write drafts for their padded batch here."""
        self.graph_tokens = torch.empty(
            (max_batch_size * (self.block_size - 1),), dtype=torch.int64, device=self.weight.device
        )

    def capture_hook(self, runner, output, forward_batch, num_tokens: int) -> None:
        """SGLang `capture_tail_hooks` entry: folds the head into the drafter's captured forward."""
        tokens = self(output.hidden_states[:num_tokens])
        self.graph_tokens[: tokens.shape[0]].copy_(tokens)

    def graph_output(self, batch_size: int) -> torch.Tensor:
        """What the last graph replay wrote for its first `batch_size` requests, as `__call__` returns it."""
        return self.graph_tokens[: batch_size * (self.block_size - 1)]

    def _draft_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Row 0 of each block is the anchor, already known; the drafts are rows 1..B-1.
        hidden = hidden_states.view(-1, self.block_size, hidden_states.shape[-1])[:, 1:]
        return hidden.reshape(-1, hidden.shape[-1]).to(self.weight.dtype)


def shard_argmax(
    rows: torch.Tensor, weight, logit_multiplier: float = 1.0, softcap: float | None = None,
    num_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and arg-max of the drafter logits over one vocabulary shard; rows [N, H], weight [V_local, H]."""
    return drafter_logits(rows, weight, logit_multiplier, softcap, num_rows).max(dim=-1)


def select_across_shards(shard_max: torch.Tensor, shard_ids: torch.Tensor) -> torch.Tensor:
    """shard_max, shard_ids [tp, N] in rank order -> the global argmax ids [N] (first maximum wins)."""
    best_rank = shard_max.argmax(dim=0, keepdim=True)
    return shard_ids.gather(0, best_rank).squeeze(0)


class TopkDraftHead(GreedyDraftHead):
    """Block rows 1..B-1 -> the drafter's top-k tokens per position with their log-probabilities (tree mode).

    Under tensor parallelism each rank takes its shard's top-k and log-sum-exp; the k * tp candidates and the
    shards' normalizers are all-gathered, and the global top-k of the candidates is the full-vocab top-k.
    """

    def __init__(self, *args, topk: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.topk = topk
        self.graph_logprobs: torch.Tensor | None = None

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states [bs * B, H] -> (log-probs [bs * (B-1), k] float32 descending, token ids [bs * (B-1), k])."""
        rows = self._draft_rows(hidden_states)
        logits = drafter_logits(rows, self.weight, self.logit_multiplier, self.softcap, self.num_rows)
        values, ids = logits.topk(self.topk, dim=-1)
        normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
        ids = ids + self.vocab_start
        if self.tp_group is not None:
            values, ids, normalizer = self._gather_shards(values, ids, normalizer)
        return values - normalizer, ids

    def _gather_shards(self, values, ids, normalizer):
        world, n = self.tp_group.world_size, values.shape[0]
        gathered = [values.new_empty((world * n, self.topk)), ids.new_empty((world * n, self.topk)),
                    normalizer.new_empty((world * n, 1))]
        for out, local in zip(gathered, (values, ids, normalizer)):
            self.tp_group.all_gather_into_tensor(out, local.contiguous())
        values, ids, normalizer = (t.view(world, n, -1).transpose(0, 1).reshape(n, -1) for t in gathered)
        best, pick = values.topk(self.topk, dim=-1)
        return best, ids.gather(1, pick), torch.logsumexp(normalizer, dim=-1, keepdim=True)

    def allocate_graph_output(self, max_batch_size: int) -> None:
        rows = max_batch_size * (self.block_size - 1)
        device = self.weight.device
        self.graph_logprobs = torch.empty((rows, self.topk), dtype=torch.float32, device=device)
        self.graph_tokens = torch.empty((rows, self.topk), dtype=torch.int64, device=device)

    def capture_hook(self, runner, output, forward_batch, num_tokens: int) -> None:
        logprobs, tokens = self(output.hidden_states[:num_tokens])
        self.graph_logprobs[: logprobs.shape[0]].copy_(logprobs)
        self.graph_tokens[: tokens.shape[0]].copy_(tokens)

    def graph_output(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = batch_size * (self.block_size - 1)
        return self.graph_logprobs[:rows], self.graph_tokens[:rows]


def drafter_logits(rows: torch.Tensor, weight, logit_multiplier: float = 1.0, softcap: float | None = None,
                   num_rows: int | None = None) -> torch.Tensor:
    """Float32 drafter logits over one vocabulary shard; rows [N, H], weight [V_local, H] (a tensor or an
    `Fp8HeadWeight`) of which the first `num_rows` (default all) are real vocabulary rows, the rest padding."""
    if isinstance(weight, Fp8HeadWeight):
        logits = weight.logits(rows)[:, :num_rows]  # the padded matrix keeps the FP8 GEMM's shapes aligned
    else:
        logits = (rows @ weight[:num_rows].T).float()
    if logit_multiplier != 1.0:
        logits = logits * logit_multiplier
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
FP8_ALIGN = 16  # torch._scaled_mm wants both matrix dimensions it does not reduce, and the reduced one, in 16s


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (float8_e4m3fn [N, H], float32 scales [N]): each row scaled so its largest magnitude is FP8_MAX
    (an all-zero row keeps a tiny scale, so it stays zero)."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_gemm_available(device: torch.device) -> bool:
    """Whether this device runs FP8 matrix products (torch._scaled_mm): CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8HeadWeight:
    """An FP8 copy of the head's rows, one float32 scale per row. `logits` quantizes the draft rows the same way
    (one scale per row) and multiplies on the FP8 tensor cores where the device has them (`torch._scaled_mm`, rows
    padded to a multiple of 16), else in float32 on the dequantized values: the same products, the reference."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self.qweight, self.scale, self.dtype = qweight, scale, dtype  # dtype: the draft rows' (the head's own)
        self.fp8_gemm = fp8_gemm_available(qweight.device)

    @classmethod
    def quantize(cls, weight: torch.Tensor, chunk_rows: int = 8192) -> Fp8HeadWeight:
        """A chunk of rows at a time: their float32 working copies stay small (a whole 152k x 5120 head's would
        take 6 GB at startup)."""
        qweight = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
        scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        for start in range(0, weight.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            qweight[rows], scale[rows] = quantize_rows_fp8(weight[rows])
        return cls(qweight, scale, weight.dtype)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, H] -> float32 logits [N, V]."""
        count = rows.shape[0]
        if self.fp8_gemm:
            padded = torch.nn.functional.pad(rows, (0, 0, 0, (-count) % FP8_ALIGN))
            q_rows, row_scale = quantize_rows_fp8(padded)
            out = torch._scaled_mm(q_rows, self.qweight.t(), scale_a=row_scale[:, None],
                                   scale_b=self.scale[None, :], out_dtype=torch.bfloat16)
            return out[:count].float()
        q_rows, row_scale = quantize_rows_fp8(rows)
        return (q_rows.float() * row_scale[:, None]) @ (self.qweight.float() * self.scale[:, None]).T


def check_fp8_head(weight: torch.Tensor) -> list[str]:
    """Every reason `--speculative-dflash-draft-head-fp8` cannot serve this head (the target's `lm_head.weight`)."""
    errors = []
    if not fp8_gemm_available(weight.device):
        errors.append(f"{FP8_HEAD_FLAG} needs FP8 matrix products (a CUDA GPU of compute capability 8.9 or newer, "
                      f"e.g. L40S, H100, H200, B200); the head is on {weight.device}: drop {FP8_HEAD_FLAG}")
    if any(size % FP8_ALIGN for size in weight.shape):
        errors.append(f"{FP8_HEAD_FLAG} needs the head's rows and hidden size in multiples of {FP8_ALIGN} (FP8 "
                      f"GEMM shapes); this head is {list(weight.shape)}: drop {FP8_HEAD_FLAG}")
    return errors
