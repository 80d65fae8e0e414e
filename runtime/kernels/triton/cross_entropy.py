"""Fused linear cross-entropy in Triton: ``cross_entropy(softcap(hidden @ weight.T + bias), labels)``
(+ z-loss), forward and backward, twin of ``fgc_runtime.kernels.cross_entropy``'s reference.

Shape legend: N rows (tokens), D hidden size, V vocabulary size; tiles of BN rows, BV vocabulary
entries and BD hidden units.

No logit is ever stored, not even a chunk's: every kernel computes its logits tile by tile
(``h_tile @ w_tile.T`` over D, fp32 accumulation) and uses them at once.

1. ``_lse_kernel``, one program a block of BN rows: the logits of the block, one vocabulary tile
   at a time, with an online logsumexp (running max and rescaled sum), the target's logit and
   (label smoothing) the sum of the logits; writes each row's logsumexp and loss.
2. ``_grad_hidden_kernel``, one program a block of rows: recomputes the block's logits tile by
   tile, turns each tile into its gradient ``dz = w (p (1 + 2 z_loss lse) - (1 - eps) onehot(y)
   - eps / V)`` (times ``1 - t²`` through the soft-cap ``z = cap * t``, ``t = tanh(x / cap)``),
   and adds ``dz @ w_tile`` into the block's rows of an fp32 gradient of the hidden states.
3. ``_grad_weight_kernel``, one program a vocabulary tile: the same tiles the other way round,
   adding ``dz.T @ h_tile`` into the tile's rows of an fp32 weight gradient, and summing ``dz``
   over rows for the bias.

``w`` is a per-row weight: 1 / (non-ignored rows) for ``mean``, 1 for ``sum``, the upstream
gradient for ``none``, and 0 on ignored rows, so an ignored row adds exactly nothing. Each program
owns the rows of the gradient it writes, so there are no atomics: results are deterministic.

With ``reduction`` ``mean`` or ``sum`` the gradients are computed in the forward (the loss is a
scalar, its row weights known) and the backward only scales them; with ``none`` the backward runs
kernels 2 and 3 with the upstream gradient as row weights.

Matmul precision: fp32 inputs are multiplied in full fp32 (``input_precision="ieee"``, no TF32);
bf16/fp16 inputs on a GPU are multiplied in their dtype with fp32 accumulation (the gradient tile
rounded to that dtype first, as the reference's backward does). Triton's CPU interpreter (the
tests) computes bf16 arithmetic wrongly, so there bf16 tiles are upcast to fp32 right after their
load, which gives the GPU's products exactly (a bf16 product is exact in fp32); fp16 runs the
GPU's path there, so the tests check it too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._impl import triton_interpreting

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_mask,
    col_mask,
    D,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    """(z, t): the tile's logits as the loss sees them (fp32, after bias and soft-cap) and
    ``tanh(x / cap)`` (soft-capping only, else z)."""
    x = tl.zeros((BN, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_mask = ds < D
        h = tl.load(h_ptr + rows[:, None] * D + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * D + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if DOT_FP32:
            x = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), x, input_precision="ieee")
        else:
            x = tl.dot(h, tl.trans(w), x)
    if HAS_BIAS:
        x += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        # tanh(a) = sign(a) (1 - e^(-2|a|)) / (1 + e^(-2|a|)): no overflow for any a
        a = x / softcap
        e = tl.exp(-2.0 * tl.abs(a))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(a < 0, -t, t)
        return softcap * t, t
    return x, x


@triton.jit
def _grad_tile(
    z,
    t,
    y,
    lse,
    row_w,
    cols,
    col_mask,
    V,
    label_smoothing,
    z_loss,
    SOFTCAP: tl.constexpr,
):
    """d loss / d x for one tile (fp32, 0 outside the vocabulary and on rows of weight 0)."""
    p = tl.exp(z - lse[:, None])
    g = p * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / V
    g = tl.where(cols[None, :] == y[:, None], g - (1.0 - label_smoothing), g)
    g = g * row_w[:, None]
    if SOFTCAP:
        g = g * (1.0 - t * t)
    return tl.where(col_mask[None, :], g, 0.0)


@triton.jit
def _lse_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    loss_ptr,
    N,
    V,
    D,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    # int64 offsets: rows * D and cols * D can pass 2**31 for large heads
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index)
    m = tl.full((BN,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BN,), dtype=tl.float32)
    target = tl.zeros((BN,), dtype=tl.float32)
    z_sum = tl.zeros((BN,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV).to(tl.int64)
        col_mask = cols < V
        z, t = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            DOT_FP32,
            BN,
            BV,
            BD,
        )
        z_in = tl.where(col_mask[None, :], z, float("-inf"))
        # the first tile holds column 0, so m_new is finite from the start and no -inf - -inf
        m_new = tl.maximum(m, tl.max(z_in, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z_in - m_new[:, None]), axis=1)
        m = m_new
        target += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
    lse = m + tl.log(s)
    loss = (1.0 - label_smoothing) * (lse - target) + label_smoothing * (lse - z_sum / V) + z_loss * lse * lse
    valid = row_mask & (y != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)


@triton.jit
def _grad_hidden_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    roww_ptr,
    gh_ptr,
    N,
    V,
    D,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    row_w = tl.load(roww_ptr + rows, mask=row_mask, other=0.0)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV).to(tl.int64)
        col_mask = cols < V
        z, t = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            DOT_FP32,
            BN,
            BV,
            BD,
        )
        g = _grad_tile(z, t, y, lse, row_w, cols, col_mask, V, label_smoothing, z_loss, SOFTCAP)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_mask = ds < D
            w = tl.load(w_ptr + cols[:, None] * D + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            out = gh_ptr + rows[:, None] * D + ds[None, :]
            out_mask = row_mask[:, None] & d_mask[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            if DOT_FP32:
                acc = tl.dot(g, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g.to(w.dtype), w, acc)
            tl.store(out, acc, mask=out_mask)


@triton.jit
def _grad_weight_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    lse_ptr,
    roww_ptr,
    gw_ptr,
    gb_ptr,
    N,
    V,
    D,
    label_smoothing,
    z_loss,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    GRAD_W: tl.constexpr,
    GRAD_B: tl.constexpr,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BD: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BV + tl.arange(0, BV)
    col_mask = cols < V
    gb = tl.zeros((BV,), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN).to(tl.int64)
        row_mask = rows < N
        y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        row_w = tl.load(roww_ptr + rows, mask=row_mask, other=0.0)
        z, t = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            row_mask,
            col_mask,
            D,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            DOT_FP32,
            BN,
            BV,
            BD,
        )
        g = _grad_tile(z, t, y, lse, row_w, cols, col_mask, V, label_smoothing, z_loss, SOFTCAP)
        if GRAD_B:
            gb += tl.sum(g, axis=0)
        if GRAD_W:
            g_t = tl.trans(g)
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                d_mask = ds < D
                h = tl.load(
                    h_ptr + rows[:, None] * D + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
                )
                out = gw_ptr + cols[:, None] * D + ds[None, :]
                out_mask = col_mask[:, None] & d_mask[None, :]
                acc = tl.load(out, mask=out_mask, other=0.0)
                if DOT_FP32:
                    acc = tl.dot(g_t, h.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(g_t.to(h.dtype), h, acc)
                tl.store(out, acc, mask=out_mask)
    if GRAD_B:
        tl.store(gb_ptr + cols, gb, mask=col_mask)


def _config(dtype: torch.dtype) -> dict:
    """Tile sizes, warps and the matmul precision flag (``DOT_FP32``: upcast every tile to fp32
    and multiply in full fp32). The interpreter costs about 1 ms a program and a loop step, so it
    gets the smallest tiles ``tl.dot`` accepts (16); its bf16 arithmetic is wrong, so bf16 is
    upcast there, while fp16 runs the GPU's path (multiplied in fp16, fp32 accumulation)."""
    fp32 = dtype == torch.float32
    if triton_interpreting():
        return dict(BN=16, BV=32, BD=16, DOT_FP32=fp32 or dtype == torch.bfloat16, num_warps=1)
    return dict(BN=64, BV=64, BD=32 if fp32 else 64, DOT_FP32=fp32, num_warps=4)


def _gradients(h_ND, w_VD, b_V, y_N, lse_N, roww_N, needs, consts):
    """(grad hidden, grad weight, grad bias) in fp32 (None where not needed), for row weights roww_N."""
    N, D = h_ND.shape
    V = w_VD.shape[0]
    cfg = _config(h_ND.dtype)
    meta = dict(BN=cfg["BN"], BV=cfg["BV"], BD=cfg["BD"], DOT_FP32=cfg["DOT_FP32"], num_warps=cfg["num_warps"])
    ls, zl, cap, has_bias, has_cap = consts
    b_arg = b_V if b_V is not None else w_VD  # never read without HAS_BIAS
    gh = torch.zeros((N, D), dtype=torch.float32, device=h_ND.device) if needs[0] else None
    gw = torch.zeros((V, D), dtype=torch.float32, device=h_ND.device) if needs[1] else None
    gb = torch.empty(V, dtype=torch.float32, device=h_ND.device) if needs[2] else None
    if gh is not None:
        _grad_hidden_kernel[(triton.cdiv(N, cfg["BN"]),)](
            h_ND,
            w_VD,
            b_arg,
            y_N,
            lse_N,
            roww_N,
            gh,
            N,
            V,
            D,
            ls,
            zl,
            cap,
            HAS_BIAS=has_bias,
            SOFTCAP=has_cap,
            **meta,
        )
    if gw is not None or gb is not None:
        _grad_weight_kernel[(triton.cdiv(V, cfg["BV"]),)](
            h_ND,
            w_VD,
            b_arg,
            y_N,
            lse_N,
            roww_N,
            gw if gw is not None else lse_N,
            gb if gb is not None else lse_N,
            N,
            V,
            D,
            ls,
            zl,
            cap,
            HAS_BIAS=has_bias,
            SOFTCAP=has_cap,
            GRAD_W=gw is not None,
            GRAD_B=gb is not None,
            **meta,
        )
    return gh, gw, gb


class TritonLinearCrossEntropy(torch.autograd.Function):
    """The loss of ``hidden_ND @ weight_VD.T (+ bias_V)`` against ``labels_N`` with Triton forward
    and backward; ``reduction`` ``mean``, ``sum`` or ``none``."""

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
        grad_enabled,
    ):
        N, D = hidden_ND.shape
        V = weight_VD.shape[0]
        cfg = _config(hidden_ND.dtype)
        has_bias, has_cap = bias_V is not None, softcap is not None
        consts = (label_smoothing, z_loss, softcap if has_cap else 1.0, has_bias, has_cap)
        lse_N = torch.empty(N, dtype=torch.float32, device=hidden_ND.device)
        loss_N = torch.empty(N, dtype=torch.float32, device=hidden_ND.device)
        _lse_kernel[(triton.cdiv(N, cfg["BN"]),)](
            hidden_ND,
            weight_VD,
            bias_V if has_bias else weight_VD,
            labels_N,
            lse_N,
            loss_N,
            N,
            V,
            D,
            ignore_index,
            label_smoothing,
            z_loss,
            consts[2],
            HAS_BIAS=has_bias,
            SOFTCAP=has_cap,
            DOT_FP32=cfg["DOT_FP32"],
            BN=cfg["BN"],
            BV=cfg["BV"],
            BD=cfg["BD"],
            num_warps=cfg["num_warps"],
        )
        valid_N = labels_N != ignore_index
        # under no_grad (evaluation) nothing will call the backward: no gradient work in the forward
        needs = tuple(
            bool(grad_enabled and need)
            for need in (ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2])
        )
        ctx.reduction, ctx.needs, ctx.consts = reduction, needs, consts
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype, bias_V.dtype if has_bias else None)
        if reduction == "none":
            ctx.save_for_backward(hidden_ND, weight_VD, bias_V, labels_N, lse_N, valid_N)
            return loss_N
        # a scalar loss: its row weights are known now, so the gradients are computed here
        if reduction == "mean":
            scale = 1.0 / valid_N.sum().clamp(min=1).float()
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden_ND.device)
        roww_N = torch.where(valid_N, scale, torch.zeros_like(scale))
        grads = (
            _gradients(hidden_ND, weight_VD, bias_V, labels_N, lse_N, roww_N, needs, consts)
            if any(needs)
            else (None,) * 3
        )
        # kept until the backward in the inputs' dtypes (as the chunked loss does): half the
        # memory of fp32 for bf16 heads
        ctx.save_for_backward(
            *(g.to(dtype) if g is not None else torch.empty(0) for g, dtype in zip(grads, ctx.dtypes))
        )
        return loss_N.sum() * scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "none":
            hidden_ND, weight_VD, bias_V, labels_N, lse_N, valid_N = ctx.saved_tensors
            roww_N = torch.where(valid_N, grad_out.float(), torch.zeros((), device=grad_out.device))
            grads = _gradients(
                hidden_ND, weight_VD, bias_V, labels_N, lse_N, roww_N.contiguous(), ctx.needs, ctx.consts
            )
        else:
            grads = tuple(g * grad_out.to(g.dtype) if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
        out = [g.to(dtype) if g is not None else None for g, dtype in zip(grads, ctx.dtypes)]
        return out[0], out[1], out[2], None, None, None, None, None, None, None


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
) -> torch.Tensor:
    """The loss of ``hidden_ND @ weight_VD.T (+ bias_V)`` (soft-capped, with label smoothing and
    z-loss as in ``fused_linear_cross_entropy``) against ``labels_N``, never storing a logit.

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
        torch.is_grad_enabled(),
    )
