"""Normalisation layers.

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Literal

import torch
from torch import nn

from fgc_runtime.kernels import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, as in Llama (no bias, no mean subtraction).

    `offset`: the scale is `offset + weight` (Gemma stores it as `weight - 1`: offset 1.0, and
    the weight starts at 0), computed in fp32 as transformers' GemmaRMSNorm does. `kernel_impl`
    chooses the implementation of `fgc_runtime.kernels.rms_norm`: auto, torch or triton.
    """

    kernels = ("rms_norm",)

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
        offset: float = 0.0,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.offset = offset
        self.kernel_impl = kernel_impl
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - offset))

    def reset_parameters(self) -> None:
        """Set the scale back to ones (the weight to `1 - offset`)."""
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # The kernel normalises in fp32 and returns x's dtype, like transformers' LlamaRMSNorm.
        return rms_norm(
            x_BTD, self.weight, self.eps, self.offset, impl=self.kernel_impl
        )

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        impl = f", kernel_impl={self.kernel_impl}" if self.kernel_impl != "auto" else ""
        return f"{self.hidden_size}, eps={self.eps}{offset}{impl}"
