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


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` (``(B, H, T, D)``) by ``cos``/``sin`` (``(B, T, D)``); returns ``(q, k)``.

    ``impl``: ``auto`` or ``torch`` run the torch reference, ``triton`` the Triton kernel (forward
    and backward for ``q`` and ``k``; ``cos``/``sin`` get no gradient; see ``_impl.check_impl``
    for where it runs).
    """
    if check_impl(impl, q, k, cos, sin) == "triton":
        return triton_kernel("rope", "apply_rope_triton")(q, k, cos, sin)
    return apply_rope_torch(q, k, cos, sin)
