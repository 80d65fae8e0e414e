"""Gated feed-forward blocks.

Shape legend: B batch, T sequence, D hidden size, I intermediate size.
"""

from typing import Literal

import torch
from torch import nn

from fgc_runtime.kernels import swiglu


class SwiGLUMLP(nn.Module):
    """SwiGLU feed-forward, `down(silu(gate(x)) * up(x))`, as in transformers' LlamaMLP.

    `kernel_impl` chooses the implementation of `fgc_runtime.kernels.swiglu`: auto, torch or
    triton.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        mlp_bias: bool = False,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.kernel_impl = kernel_impl
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTI = swiglu(self.gate_proj(x_BTD), self.up_proj(x_BTD), impl=self.kernel_impl)
        return self.down_proj(h_BTI)
