"""RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``, computed in fp32.

Shape legend: B batch, T sequence, D hidden (the normalised, last dim); ``...`` any leading dims.
"""

from __future__ import annotations

import torch

from ._impl import check_impl, triton_kernel


def rms_norm_torch(
    x_BTD: torch.Tensor, weight_D: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> torch.Tensor:
    """The torch reference: normalise over the last dim in fp32, return in ``x``'s dtype."""
    x32_BTD = x_BTD.float()
    inv_rms_BT1 = torch.rsqrt(x32_BTD.pow(2).mean(dim=-1, keepdim=True) + eps)
    # offset=1.0 serves models that store the scale as (weight - 1), e.g. Gemma
    y_BTD = x32_BTD * inv_rms_BT1 * (offset + weight_D.float())
    return y_BTD.to(x_BTD.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, scaled by ``offset + weight``; fp32 math, ``x.dtype`` out.

    ``impl``: ``auto`` or ``torch`` run the torch reference, ``triton`` the Triton kernel (forward
    and backward; see ``_impl.check_impl`` for where it runs).
    """
    if check_impl(impl, x, weight) == "triton":
        return triton_kernel("rms_norm", "rms_norm_triton")(x, weight, eps=eps, offset=offset)
    return rms_norm_torch(x, weight, eps=eps, offset=offset)
