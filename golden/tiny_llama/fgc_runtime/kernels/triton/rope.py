"""Rotary position embedding in Triton (rotate-half convention), twin of ``apply_rope_torch``.

Shape legend: B batch, H heads (query heads for q, key/value heads for k), T sequence, D head dim,
d = D // 2 (one half of the head dim).

With ``x = [x1, x2]`` split at d (and likewise ``cos = [c1, c2]``, ``sin = [s1, s2]``), the forward
``x * cos + rotate_half(x) * sin`` is

    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2

and its gradient w.r.t. x (the transposed, i.e. inverse, rotation of the upstream gradient dy) is

    dx1 = dy1 * c1 + dy2 * s2
    dx2 = dy2 * c2 - dy1 * s1

One kernel does both: the backward is the forward with ``(s1, s2)`` replaced by ``(-s2, -s1)``.
cos and sin get no gradient.

Layout: in the model q and k are ``x.view(B, T, H, D).transpose(1, 2)``, not contiguous, and cos and
sin may be expanded over the batch (stride 0); the kernel takes all their strides, and needs only the
last dim to have stride 1. One program handles one (b, t) position and a block of heads: it loads that
position's cos/sin once and reuses them for every head. Outputs (and input gradients) have the
memory layout of their input when it is dense (``torch.empty_like``), so the model's transposed q
gives a transposed output, as the torch twin does; otherwise they are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import to_output

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one half-tile (heads x d) per program; a program touches twice that of x and of y.
_MAX_TILE = 4096


@triton.jit
def _rope_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    y_ptr,
    T,
    H,
    HALF,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_cb,
    stride_ct,
    stride_sb,
    stride_st,
    stride_yb,
    stride_yh,
    stride_yt,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # int64 before any stride product: b * stride_b can exceed 2**31 for long sequences
    bt = tl.program_id(0).to(tl.int64)
    b = bt // T
    t = bt % T
    h = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    d_mask = d < HALF
    mask = (h < H)[:, None] & d_mask[None, :]

    cos_row = cos_ptr + b * stride_cb + t * stride_ct
    sin_row = sin_ptr + b * stride_sb + t * stride_st
    c1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # the transposed rotation: y1 = x1*c1 + x2*s2, y2 = x2*c2 - x1*s1
        s1, s2 = -s2, -s1

    x_tile = x_ptr + b * stride_xb + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_tile, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_tile + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]

    y_tile = y_ptr + b * stride_yb + t * stride_yt + h[:, None] * stride_yh + d[None, :]
    tl.store(y_tile, to_output(y1, y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_tile + HALF, to_output(y2, y_ptr.dtype.element_ty), mask=mask)


def _rotate(
    x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor, backward: bool
) -> torch.Tensor:
    """Launch the kernel on one tensor; returns a new tensor of x's shape, dtype and layout."""
    if x_BHTD.stride(-1) != 1:
        # Only an unusual caller gets here (the model's q/k have a unit last stride); one copy
        # is simpler than a second, strided kernel variant.
        x_BHTD = x_BHTD.contiguous()
    y_BHTD = torch.empty_like(x_BHTD)
    B, H, T, D = x_BHTD.shape
    if y_BHTD.numel() == 0:
        return y_BHTD
    half = D // 2
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(H), max(1, _MAX_TILE // block_half))
    tile = 2 * block_h * block_half  # elements of x one program loads
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    grid = (B * T, triton.cdiv(H, block_h))
    _rope_kernel[grid](
        x_BHTD,
        cos_BTD,
        sin_BTD,
        y_BHTD,
        T,
        H,
        half,
        x_BHTD.stride(0),
        x_BHTD.stride(1),
        x_BHTD.stride(2),
        cos_BTD.stride(0),
        cos_BTD.stride(1),
        sin_BTD.stride(0),
        sin_BTD.stride(1),
        y_BHTD.stride(0),
        y_BHTD.stride(1),
        y_BHTD.stride(2),
        BACKWARD=backward,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return y_BHTD


class RopeFunction(torch.autograd.Function):
    """Rotate q and k by cos/sin; Triton forward and backward, gradients for q and k only."""

    @staticmethod
    def forward(ctx, q_BHTD, k_BKTD, cos_BTD, sin_BTD):
        # an unused output's gradient stays None (no zeros made, no launch for it)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(cos_BTD, sin_BTD)
        q_out_BHTD = _rotate(q_BHTD, cos_BTD, sin_BTD, backward=False)
        k_out_BKTD = _rotate(k_BKTD, cos_BTD, sin_BTD, backward=False)
        # as in the torch twin, an output whose input needs no grad does not require grad
        if not ctx.needs_input_grad[0]:
            ctx.mark_non_differentiable(q_out_BHTD)
        if not ctx.needs_input_grad[1]:
            ctx.mark_non_differentiable(k_out_BKTD)
        return q_out_BHTD, k_out_BKTD

    @staticmethod
    def backward(ctx, dq_out_BHTD, dk_out_BKTD):
        cos_BTD, sin_BTD = ctx.saved_tensors
        dq_BHTD = dk_BKTD = None
        if ctx.needs_input_grad[0] and dq_out_BHTD is not None:
            dq_BHTD = _rotate(dq_out_BHTD, cos_BTD, sin_BTD, backward=True)
        if ctx.needs_input_grad[1] and dk_out_BKTD is not None:
            dk_BKTD = _rotate(dk_out_BKTD, cos_BTD, sin_BTD, backward=True)
        return dq_BHTD, dk_BKTD, None, None


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin)``; differentiable in q, k.

    q: ``(B, H, T, D)``, k: ``(B, K, T, D)`` (K may differ from H), cos and sin: ``(B, T, D)``
    (or ``(1, T, D)``, broadcast over the batch), broadcast over heads; D even. q, k, cos and sin
    must share one dtype (fp32, bf16 or fp16; the model casts the fp32 tables to q's dtype first)
    and one device. Any strides are accepted; a tensor whose last dim is not unit-stride is copied
    first. Computed in fp32, returned in q's dtype, in q's (k's) memory layout when it is dense.
    cos and sin must not require grad.
    """
    for name, tensor, dims in (
        ("q", q, 4),
        ("k", k, 4),
        ("cos", cos, 3),
        ("sin", sin, 3),
    ):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"apply_rope_triton: {name} must be a tensor")
        if tensor.dim() != dims:
            raise ValueError(
                f"apply_rope_triton: {name} must have {dims} dims, got shape {tuple(tensor.shape)}"
            )
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(
            f"apply_rope_triton: k {tuple(k.shape)} must be (B, K, T, D) with q's B, T and D "
            f"(q is {tuple(q.shape)})"
        )
    if D % 2:
        raise ValueError(f"apply_rope_triton: the head dim D must be even, got {D}")
    if cos.shape != sin.shape:
        raise ValueError(
            f"apply_rope_triton: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape"
        )
    if cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D):
        raise ValueError(
            f"apply_rope_triton: cos and sin must be (B, T, D) = {(B, T, D)} (or (1, T, D)), "
            f"got {tuple(cos.shape)}"
        )
    if cos.requires_grad or sin.requires_grad:
        raise ValueError(
            "apply_rope_triton: cos and sin must not require grad (the kernel gives no gradient "
            "for them); pass detached tables"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(
            f"apply_rope_triton: dtype {q.dtype} is not supported (expected float32, bfloat16 or float16)"
        )
    if not (k.dtype == cos.dtype == sin.dtype == q.dtype):
        raise ValueError(
            f"apply_rope_triton: q, k, cos and sin must have one dtype, got {q.dtype}, {k.dtype}, "
            f"{cos.dtype} and {sin.dtype} (cast cos and sin to q's dtype)"
        )
    if not (k.device == cos.device == sin.device == q.device):
        raise ValueError(
            f"apply_rope_triton: q, k, cos and sin must be on one device, got {q.device}, "
            f"{k.device}, {cos.device} and {sin.device}"
        )
    # Broadcast a batch of one with stride 0, as the torch twin's broadcasting does.
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    # rare (the model's tables are contiguous), and the tables are small
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    return RopeFunction.apply(q, k, cos, sin)
