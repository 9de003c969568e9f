"""The per-row cross-entropy of the drafter's training loss and its gradient wrt the logits, from logits already
computed: a Triton kernel on CUDA, `soft_cross_entropy_rows_reference` elsewhere (and under DFLASH_KERNELS=reference).

For student logits s [R, V] (multiplier and softcap applied), optional teacher logits t [R, V] and labels
y = (1 - soft) * onehot(target) + soft * softmax(t):

    loss_r = -sum_v y_v log softmax(s)_v = lse(s) - (1 - soft) s_target - soft * sum_v softmax(t)_v s_v
    dlogits = (softmax(s) - y) * (1 - (s / softcap)^2)          (the last factor only with a softcap)

Why a kernel: with soft labels over SmolLM2's 49,152-word vocabulary this was half a training step on the H200
(39 of 81 ms, `profile_train.py`, 2026-11-30): torch makes about sixteen float32 passes over the vocabulary-sized
rows (log-softmax, softmax, the label's scatter, the dot, exp, subtract, the cast). Here the two log-sum-exps are
one read each and the kernel reads s and t once and writes dlogits once, in the matmul's dtype.
"""

from __future__ import annotations

import torch

from dflash_sglang.kernels.jit import use_triton

OP = "soft_cross_entropy_rows"
BLOCK = 2048  # vocabulary columns a program handles per iteration of its row loop

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the reference serves
    triton = None

if triton is not None:

    @triton.jit
    def _soft_ce_rows_kernel(s_ptr, t_ptr, lse_s_ptr, lse_t_ptr, target_ptr, grad_ptr, loss_ptr,
                             stride_s, stride_t, stride_g, soft, softcap, VOCAB: tl.constexpr,
                             HAS_TEACHER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
        # The vocabulary size is a compile-time constant: one model's, compiled once (and Triton's CPU interpreter,
        # which the CPU test runs, cannot take a runtime loop bound).
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * stride_s
        g_row = grad_ptr + row * stride_g
        lse_s = tl.load(lse_s_ptr + row)
        target = tl.load(target_ptr + row)
        lse_t = 0.0
        if HAS_TEACHER:
            lse_t = tl.load(lse_t_ptr + row)
        teacher_dot = tl.zeros([BLOCK_V], dtype=tl.float32)
        for start in range(0, VOCAB, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < VOCAB
            s = tl.load(s_row + cols, mask=inside, other=0.0)
            label = tl.where(cols == target, 1.0 - soft, 0.0)
            if HAS_TEACHER:
                t = tl.load(t_ptr + row * stride_t + cols, mask=inside, other=float("-inf"))
                q = tl.exp(t - lse_t)
                teacher_dot += tl.where(inside, q * s, 0.0)
                label += soft * q
            g = tl.exp(s - lse_s) - label
            if HAS_SOFTCAP:
                c = s / softcap
                g = g * (1.0 - c * c)
            tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
        loss = lse_s - (1.0 - soft) * tl.load(s_row + target)
        if HAS_TEACHER:
            loss -= soft * tl.sum(teacher_dot, axis=0)
        tl.store(loss_ptr + row, loss)


def soft_cross_entropy_rows(logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor,
                            soft: float, softcap: float | None, grad_dtype: torch.dtype,
                            need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss [R] float32, dlogits [R, V] in `grad_dtype` or None without `need_grad`) for float32 logits [R, V]
    (softcap already applied), teacher logits [R, V] (teacher softcap applied) when `soft` > 0, targets [R].
    `logits` may be overwritten (the reference reuses its memory)."""
    if teacher_logits is None and soft:
        raise ValueError("soft labels need teacher logits")
    if not use_triton(OP, logits, triton):
        return soft_cross_entropy_rows_reference(logits, teacher_logits, target, soft, softcap, grad_dtype,
                                                 need_grad)
    loss, grad = soft_cross_entropy_rows_triton(logits, teacher_logits, target, soft, softcap, grad_dtype)
    return loss, grad if need_grad else None


def soft_cross_entropy_rows_triton(logits: torch.Tensor, teacher_logits: torch.Tensor | None, target: torch.Tensor,
                                   soft: float, softcap: float | None,
                                   grad_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's launch, wherever Triton runs it (CUDA; CPU tensors under TRITON_INTERPRET=1, as its test does)."""
    rows, vocab = logits.shape
    logits = logits.contiguous()
    grad = torch.empty((rows, vocab), dtype=grad_dtype, device=logits.device)
    loss = torch.empty((rows,), dtype=torch.float32, device=logits.device)
    lse_s = torch.logsumexp(logits, dim=-1)
    has_teacher = teacher_logits is not None and bool(soft)
    if has_teacher:
        teacher_logits = teacher_logits.contiguous()
        lse_t = torch.logsumexp(teacher_logits, dim=-1)
    else:
        teacher_logits, lse_t = logits, lse_s  # never read
    if rows:
        _soft_ce_rows_kernel[(rows,)](
            logits, teacher_logits, lse_s, lse_t, target.contiguous(), grad, loss,
            logits.stride(0), teacher_logits.stride(0), grad.stride(0), float(soft if has_teacher else 0.0),
            float(softcap or 1.0), VOCAB=vocab, HAS_TEACHER=has_teacher, HAS_SOFTCAP=bool(softcap), BLOCK_V=BLOCK,
        )
    return loss, grad


def soft_cross_entropy_rows_reference(logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                                      target: torch.Tensor, soft: float, softcap: float | None,
                                      grad_dtype: torch.dtype,
                                      need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same in torch, in as few vocabulary-sized passes as torch allows (in place where it can)."""
    target = target[:, None]
    log_probs = torch.log_softmax(logits, dim=-1)
    label = None
    if soft:
        label = torch.softmax(teacher_logits, dim=-1)
        if soft != 1.0:
            label.mul_(soft)
            label.scatter_add_(1, target, torch.full_like(target, 1.0 - soft, dtype=label.dtype))
        loss = -torch.linalg.vecdot(label, log_probs)
    else:
        loss = -log_probs.gather(1, target).squeeze(1)
    if not need_grad:
        return loss, None
    grad = log_probs.exp_()  # the softmax, in place
    if label is None:
        grad.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad.dtype))
    else:
        grad.sub_(label)
    if softcap:
        grad.mul_(logits.div_(softcap).square_().neg_().add_(1.0))
    return loss, grad.to(grad_dtype)

