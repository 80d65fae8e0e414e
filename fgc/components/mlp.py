"""Feed-forward blocks: SwiGLU (Llama), gated with any activation (GeGLU: Gemma), and plain (GPT-2).

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

    # Tensor parallelism: gate and up split by output features (each rank computes some of the
    # hidden features), down by input features (the ranks' partial outputs are summed).
    tp_plan = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    tp_divisible = ("intermediate_size",)
    kernels = ("swiglu",)

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
        h_BTI = swiglu(
            self.gate_proj(x_BTD), self.up_proj(x_BTD), impl=self.kernel_impl
        )
        return self.down_proj(h_BTI)


def activate(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activation NAME, by the names transformers' configs give them (hidden_act): exact
    GELU (`gelu`), its tanh approximation (`gelu_tanh`: gelu_new, gelu_pytorch_tanh), SiLU and ReLU.
    """
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "relu":
        return torch.nn.functional.relu(x)
    raise ValueError(f"unknown activation {name!r}: gelu, gelu_tanh, silu or relu")


class GatedMLP(nn.Module):
    """Gated feed-forward with any activation, `down(act(gate(x)) * up(x))`: GeGLU with
    `activation="gelu_tanh"` (transformers' GemmaMLP). SwiGLU has its own kernel: SwiGLUMLP.
    """

    tp_plan = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    tp_divisible = ("intermediate_size",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu_tanh",
        mlp_bias: bool = False,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTI = activate(self.activation, self.gate_proj(x_BTD)) * self.up_proj(x_BTD)
        return self.down_proj(h_BTI)


class MLP(nn.Module):
    """The plain feed-forward of GPT-2 and GPT-NeoX, `down(act(up(x)))`, with biases by default."""

    tp_plan = {"up_proj": "colwise", "down_proj": "rowwise"}
    tp_divisible = ("intermediate_size",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: Literal["gelu", "gelu_tanh", "silu", "relu"] = "gelu",
        mlp_bias: bool = True,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=mlp_bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activate(self.activation, self.up_proj(x_BTD)))
