"""Rotary position embedding, rotate-half convention (transformers' Llama ``apply_rotary_pos_emb``).

Shape legend: B batch, H heads (query or key/value heads), T sequence, D head dim.
"""

from __future__ import annotations

import torch

from ._impl import check_impl, triton_kernel


def rotate_half(x_BHTD: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dim."""
    half = x_BHTD.shape[-1] // 2
    x1_BHTd = x_BHTD[..., :half]
    x2_BHTd = x_BHTD[..., half:]
    return torch.cat((-x2_BHTd, x1_BHTd), dim=-1)


def apply_rope_torch(
    q_BHTD: torch.Tensor,
    k_BHTD: torch.Tensor,
    cos_BTD: torch.Tensor,
    sin_BTD: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference, operation for operation as transformers computes it."""
    cos_B1TD = cos_BTD.unsqueeze(1)  # broadcast over heads
    sin_B1TD = sin_BTD.unsqueeze(1)
    q_out_BHTD = (q_BHTD * cos_B1TD) + (rotate_half(q_BHTD) * sin_B1TD)
    k_out_BHTD = (k_BHTD * cos_B1TD) + (rotate_half(k_BHTD) * sin_B1TD)
    return q_out_BHTD, k_out_BHTD


def rotate_half_transposed(x_BHTD: torch.Tensor) -> torch.Tensor:
    """The transpose of :func:`rotate_half`: ``[y1, y2] -> [y2, -y1]`` (what its backward does)."""
    half = x_BHTD.shape[-1] // 2
    return torch.cat((x_BHTD[..., half:], -x_BHTD[..., :half]), dim=-1)


class _BF16RopeTorch(torch.autograd.Function):
    """:func:`apply_rope_torch` with its backward written out, for bf16 ``q`` and ``k``.

    The gradient is the one autograd derives, ``dy * cos + rotate_half_transposed(dy * sin)``,
    operation for operation: eager results are bitwise the same, at the same speed. Under
    ``torch.compile`` on the CPU, the derived backward of bf16 tensors is slow: it goes through
    ``slice_backward`` (each half zero-padded), which inductor's CPU code turns into masked bf16
    loads, and that kernel took 1 ms a layer at the main example's shape, 7x the forward's. This
    backward compiles to one plain kernel (0.07 ms). In fp32 the derived backward compiles well
    and this one is slower, so fp32 keeps autograd's (docs/development.md, "The rotation's
    backward in bf16").
    """

    @staticmethod
    def forward(ctx, q_BHTD, k_BHTD, cos_BTD, sin_BTD):
        ctx.save_for_backward(cos_BTD, sin_BTD)
        return apply_rope_torch(q_BHTD, k_BHTD, cos_BTD, sin_BTD)

    @staticmethod
    def backward(ctx, dq_BHTD, dk_BHTD):
        cos_BTD, sin_BTD = ctx.saved_tensors
        cos_B1TD, sin_B1TD = cos_BTD.unsqueeze(1), sin_BTD.unsqueeze(1)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = dq_BHTD * cos_B1TD + rotate_half_transposed(dq_BHTD * sin_B1TD)
        if ctx.needs_input_grad[1]:
            dk = dk_BHTD * cos_B1TD + rotate_half_transposed(dk_BHTD * sin_B1TD)
        return dq, dk, None, None


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``(B, H, T, D)``) by ``cos``/``sin`` (``(B, T, D)``); returns ``(q, k)``.

    ``impl``: ``auto`` or ``torch`` run the torch reference (all in bf16: with its backward
    written out, bitwise the same, :class:`_BF16RopeTorch`), ``triton`` the Triton kernel (forward
    and backward for ``q`` and ``k``; ``cos``/``sin`` get no gradient; see ``_impl.check_impl``
    for where it runs).
    """
    if check_impl(impl, q, k, cos, sin) == "triton":
        return triton_kernel("rope", "apply_rope_triton")(q, k, cos, sin)
    bf16 = q.dtype == k.dtype == cos.dtype == sin.dtype == torch.bfloat16
    if bf16 and not (cos.requires_grad or sin.requires_grad):
        return _BF16RopeTorch.apply(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)
