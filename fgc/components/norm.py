"""Normalisation layers.

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Literal

import torch
from torch import nn

from fgc_runtime.kernels import rms_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, as in Llama (no bias, no mean subtraction).

    `kernel_impl` chooses the implementation of `fgc_runtime.kernels.rms_norm`: auto, torch or
    triton.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.kernel_impl = kernel_impl
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def reset_parameters(self) -> None:
        """Set the scale back to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        # The kernel normalises in fp32 and returns x's dtype, like transformers' LlamaRMSNorm.
        return rms_norm(x_BTD, self.weight, self.eps, impl=self.kernel_impl)

    def extra_repr(self) -> str:
        impl = f", kernel_impl={self.kernel_impl}" if self.kernel_impl != "auto" else ""
        return f"{self.hidden_size}, eps={self.eps}{impl}"
