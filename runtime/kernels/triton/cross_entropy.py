"""Fused linear cross-entropy with a Triton kernel: ``cross_entropy(softcap(hidden @ weight.T +
bias), labels)`` (+ z-loss), forward and backward, twin of ``fgc_runtime.kernels.cross_entropy``'s
reference.

Shape legend: N rows (tokens), D hidden size, V vocabulary size, C rows of a chunk.

The design of Liger-Kernel's fused linear cross-entropy: the matmuls stay with the vendor's
libraries (cuBLAS, which no hand-written tile loop matches), and Triton fuses everything between
them. Rows go a chunk at a time through the chunked loss's driver
(``fgc_runtime.kernels.cross_entropy.run_chunks``, the memory budget's chunk size): the chunk's
logits ``h_CD @ weight.T (+ bias)`` in the inputs' dtype, kept in one fp32 buffer; then one
Triton program a row (``_chunk_kernel``) reads the row's logits twice: an online logsumexp
(running max and rescaled sum) with the target's logit and (label smoothing) their sum, giving the
row's loss; then, when a gradient is needed, ``dz = w (p (1 + 2 z_loss lse) - (1 - eps) onehot(y)
- eps / V)`` (times ``1 - t²`` through the soft-cap ``z = cap * t``, ``t = tanh(x / cap)``),
written over the logits. The gradients of the hidden states (``dz @ weight``), the weight
(``dz.T @ h``, accumulated in fp32) and the bias (``dz`` summed over rows) are matmuls again.

``w`` is a per-row weight: 1 / (non-ignored rows) for ``mean``, 1 for ``sum``, the upstream
gradient for ``none``, and 0 on ignored rows, so an ignored row adds exactly nothing. The kernel
has no atomics: results are deterministic.

With ``reduction`` ``mean`` or ``sum`` the gradients are computed in the forward (the loss is a
scalar, its row weights known) and the backward only scales them; with ``none`` the forward
computes the losses only, and the backward runs the chunks again with the upstream gradient as
row weights.

The kernel reads and writes fp32 only (the logits' buffer), so Triton's CPU interpreter (the tests)
computes what the GPU computes; the matmuls of bf16 and fp16 inputs run in their dtype, as the
reference's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._impl import triton_interpreting
from ..cross_entropy import DEFAULT_CHUNK_BUDGET, chunk_rows, run_chunks

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr):
    """(z, t): the logits as the loss sees them (after the soft-cap) and ``tanh(x / cap)``
    (soft-capping only, else z)."""
    if SOFTCAP:
        # tanh(a) = sign(a) (1 - e^(-2|a|)) / (1 + e^(-2|a|)): no overflow for any a
        a = x / softcap
        e = tl.exp(-2.0 * tl.abs(a))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(a < 0, -t, t)
        return softcap * t, t
    return x, x


@triton.jit
def _chunk_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    loss_ptr,
    V,
    stride,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    SOFTCAP: tl.constexpr,
    GRAD: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride
    y = tl.load(y_ptr + row)
    m = float("-inf")
    s = 0.0
    target = 0.0
    z_sum = 0.0
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        mask = cols < V
        z, t = _capped(tl.load(x_row + cols, mask=mask, other=0.0), softcap, SOFTCAP)
        z_in = tl.where(mask, z, float("-inf"))
        # the first block holds column 0, so m_new is finite from the start and no -inf - -inf
        m_new = tl.maximum(m, tl.max(z_in, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_in - m_new), axis=0)
        m = m_new
        target += tl.sum(tl.where(cols == y, z, 0.0), axis=0)
        z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    loss = (1.0 - label_smoothing) * (lse - target) + label_smoothing * (lse - z_sum / V) + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(y != ignore_index, loss, 0.0))
    if GRAD:
        w = tl.load(w_ptr + row)
        scale = 1.0 + 2.0 * z_loss * lse
        for v0 in range(0, V, BV):
            cols = v0 + tl.arange(0, BV)
            mask = cols < V
            z, t = _capped(tl.load(x_row + cols, mask=mask, other=0.0), softcap, SOFTCAP)
            g = tl.exp(z - lse) * scale - label_smoothing / V
            g = tl.where(cols == y, g - (1.0 - label_smoothing), g) * w
            if SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(x_row + cols, g, mask=mask)


def _block(V: int) -> tuple[int, int]:
    """(BV, num_warps): the vocabulary block of one loop step and the warps of a program. In the
    interpreter (about 1 ms a loop step) blocks of 32, so that the tests' vocabularies of a
    hundred entries take several blocks, the last one partial."""
    if triton_interpreting():
        return 32, 1
    return min(triton.next_power_of_2(V), 8192), 16 if V >= 8192 else 8


def _chunk_fn(ignore_index, label_smoothing, z_loss, softcap):
    """The chunk step of ``run_chunks``: ``_chunk_kernel`` over the chunk's rows."""

    def chunk(logits_CV, y_C, valid_C, w_C, grad, capped_CV):
        C, V = logits_CV.shape
        loss_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
        BV, num_warps = _block(V)
        _chunk_kernel[(C,)](
            logits_CV,
            y_C,
            w_C,
            loss_C,
            V,
            logits_CV.stride(0),
            ignore_index,
            label_smoothing,
            z_loss,
            1.0 if softcap is None else softcap,
            SOFTCAP=softcap is not None,
            GRAD=grad,
            BV=BV,
            num_warps=num_warps,
        )
        return loss_C, logits_CV if grad else None

    return chunk


class TritonLinearCrossEntropy(torch.autograd.Function):
    """The loss of ``hidden_ND @ weight_VD.T (+ bias_V)`` against ``labels_N`` with the Triton chunk
    kernel, forward and backward; ``reduction`` ``mean``, ``sum`` or ``none``."""

    @staticmethod
    def forward(
        ctx,
        hidden_ND,
        weight_VD,
        bias_V,
        labels_N,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
        reduction,
        chunk_size,
        grad_enabled,
    ):
        has_bias = bias_V is not None
        chunk = _chunk_fn(ignore_index, label_smoothing, z_loss, softcap)
        valid_N = labels_N != ignore_index
        # under no_grad (evaluation) nothing will call the backward: no gradient work in the forward
        needs = tuple(
            bool(grad_enabled and need)
            for need in (ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2])
        )
        ctx.reduction, ctx.needs, ctx.chunk, ctx.chunk_size = reduction, needs, chunk, chunk_size
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype, bias_V.dtype if has_bias else None)
        if reduction == "none":
            loss_N, *_ = run_chunks(
                hidden_ND, weight_VD, bias_V, labels_N, valid_N, valid_N.float(), (False,) * 3, chunk_size, chunk
            )
            ctx.save_for_backward(hidden_ND, weight_VD, bias_V, labels_N, valid_N)
            return loss_N
        # a scalar loss: its row weights are known now, so the gradients are computed here
        if reduction == "mean":
            scale = 1.0 / valid_N.sum().clamp(min=1).float()
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden_ND.device)
        roww_N = torch.where(valid_N, scale, torch.zeros_like(scale))
        loss_N, *grads = run_chunks(hidden_ND, weight_VD, bias_V, labels_N, valid_N, roww_N, needs, chunk_size, chunk)
        # kept until the backward in the inputs' dtypes (as the chunked loss does): half the
        # memory of fp32 for bf16 heads
        ctx.save_for_backward(
            *(g.to(dtype) if g is not None else torch.empty(0) for g, dtype in zip(grads, ctx.dtypes))
        )
        return loss_N.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden_ND, weight_VD, bias_V, labels_N, valid_N = ctx.saved_tensors
            roww_N = torch.where(valid_N, grad_out.float(), torch.zeros((), device=grad_out.device)).contiguous()
            _, *grads = run_chunks(
                hidden_ND, weight_VD, bias_V, labels_N, valid_N, roww_N, ctx.needs, ctx.chunk_size, ctx.chunk
            )
        else:
            grads = tuple(g * grad_out.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
        out = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None, None


def fused_linear_cross_entropy_triton(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_N: torch.Tensor,
    bias_V: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    chunk_budget: int = DEFAULT_CHUNK_BUDGET,
) -> torch.Tensor:
    """The loss of ``hidden_ND @ weight_VD.T (+ bias_V)`` (soft-capped, with label smoothing and
    z-loss as in ``fused_linear_cross_entropy``) against ``labels_N``, holding one chunk's logits
    at a time: ``chunk_size`` rows, or with None as many as :func:`chunk_rows` gives for
    ``chunk_budget`` bytes.

    ``hidden_ND`` (N, D) and ``weight_VD`` (V, D) of one dtype (fp32, bf16 or fp16), ``bias_V``
    (V) of any of those, ``labels_N`` (N) integers in ``[0, V)`` or ``ignore_index``.
    ``reduction``: ``mean`` over non-ignored rows (0 when there are none), ``sum``, or ``none``
    (one fp32 value a row, 0 where ignored). Differentiable in hidden, weight and bias; gradients
    come back in their dtypes. Under autocast (mixed precision: bf16 hidden states against an fp32
    head weight) the three are cast to autocast's dtype first, as the reference's matmul is.
    """
    if torch.is_autocast_enabled(hidden_ND.device.type):
        low = torch.get_autocast_dtype(hidden_ND.device.type)
        hidden_ND, weight_VD = hidden_ND.to(low), weight_VD.to(low)
        bias_V = None if bias_V is None else bias_V.to(low)
    if hidden_ND.dim() != 2 or weight_VD.dim() != 2 or hidden_ND.shape[1] != weight_VD.shape[1]:
        raise ValueError(
            f"fused_linear_cross_entropy_triton: hidden (N, D) and weight (V, D) must share D, got "
            f"{tuple(hidden_ND.shape)} and {tuple(weight_VD.shape)}"
        )
    if labels_N.shape != hidden_ND.shape[:1]:
        raise ValueError(
            f"fused_linear_cross_entropy_triton: labels must be (N,) = ({hidden_ND.shape[0]},), got {tuple(labels_N.shape)}"
        )
    if hidden_ND.dtype not in _DTYPES or weight_VD.dtype != hidden_ND.dtype:
        raise ValueError(
            f"fused_linear_cross_entropy_triton: hidden and weight must have one dtype of float32, bfloat16 "
            f"or float16, got {hidden_ND.dtype} and {weight_VD.dtype}"
        )
    if bias_V is not None and (bias_V.shape != weight_VD.shape[:1] or bias_V.dtype not in _DTYPES):
        raise ValueError(f"fused_linear_cross_entropy_triton: bias must be ({weight_VD.shape[0]},) of a float dtype")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"fused_linear_cross_entropy_triton: unknown reduction {reduction!r}")
    N, V = hidden_ND.shape[0], weight_VD.shape[0]
    labels_N = labels_N.long().contiguous()
    # A label outside the vocabulary would match no column and count as a logit of 0 silently;
    # the reference raises, and so does this (one host sync a call).
    bad = (labels_N != ignore_index) & ((labels_N < 0) | (labels_N >= V))
    if N and bool(bad.any()):
        raise ValueError(
            f"fused_linear_cross_entropy_triton: a label is outside [0, {V}) and is not ignore_index {ignore_index}"
        )
    rows = chunk_rows(V, int(chunk_budget)) if chunk_size is None else int(chunk_size)
    if rows < 1:
        raise ValueError(f"fused_linear_cross_entropy_triton: chunk_size must be at least 1, got {chunk_size}")
    if N == 0 or V == 0:
        # nothing to launch: the reference's empty sum (mean over nothing is 0 here, as for all-ignored)
        zero = (hidden_ND.sum() * 0 + weight_VD.sum() * 0).float()
        if bias_V is not None:
            zero = zero + bias_V.sum().float() * 0
        return zero.expand(N).clone() if reduction == "none" else zero
    return TritonLinearCrossEntropy.apply(
        hidden_ND.contiguous(),
        weight_VD.contiguous(),
        None if bias_V is None else bias_V.contiguous(),
        labels_N,
        int(ignore_index),
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        reduction,
        rows,
        torch.is_grad_enabled(),
    )
