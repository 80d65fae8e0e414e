"""SwiGLU activation: ``silu(gate) * up``.

Shape legend: B batch, T sequence, F intermediate (feed-forward) size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._impl import check_impl


def swiglu_torch(gate_BTF: torch.Tensor, up_BTF: torch.Tensor) -> torch.Tensor:
    """The torch reference: ``silu(gate) * up`` in the inputs' dtype."""
    return F.silu(gate_BTF) * up_BTF


def swiglu(gate: torch.Tensor, up: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``.

    ``impl``: ``auto`` or ``torch`` run the torch reference; ``triton`` raises ValueError (no
    Triton kernels exist yet).
    """
    check_impl(impl)
    return swiglu_torch(gate, up)
