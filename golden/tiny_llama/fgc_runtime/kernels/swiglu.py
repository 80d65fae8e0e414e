"""SwiGLU activation: ``silu(gate) * up``.

Shape legend: B batch, T sequence, F intermediate (feed-forward) size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._impl import check_impl, triton_kernel


def swiglu_torch(gate_BTF: torch.Tensor, up_BTF: torch.Tensor) -> torch.Tensor:
    """The torch reference: ``silu(gate) * up`` in the inputs' dtype."""
    return F.silu(gate_BTF) * up_BTF


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``.

    ``impl``: ``auto`` or ``torch`` run the torch reference, ``triton`` the Triton kernel (forward
    and backward; see ``_impl.check_impl`` for where it runs).
    """
    if check_impl(impl, gate, up) == "triton":
        return triton_kernel("swiglu", "swiglu_triton")(gate, up)
    return swiglu_torch(gate, up)
