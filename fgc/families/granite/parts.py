"""Granite's own part: the decoder layer whose residual branches are scaled before the add.

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Callable

import torch
from torch import nn


class GraniteDecoderLayer(nn.Module):
    """Pre-norm residual decoder layer with scaled branches, as in transformers'
    GraniteDecoderLayer.

    `x + attn(norm(x)) * residual_multiplier`, then `x + mlp(norm(x)) * residual_multiplier`.
    Its children have the names of the library's PreNormDecoderLayer (`self_attn`, `mlp`,
    `input_layernorm`, `post_attention_layernorm`), so Granite checkpoints load as they are, and
    the attention and MLP declare what tensor parallelism splits. The branch is multiplied by the
    Python float, in the branch's dtype, as transformers does.
    """

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[..., nn.Module],
        mlp_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        residual_multiplier: float = 1.0,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.residual_multiplier = residual_multiplier
        self.self_attn = attention_factory(hidden_size=hidden_size)
        self.mlp = mlp_factory(hidden_size=hidden_size)
        self.input_layernorm = norm_factory(hidden_size)
        self.post_attention_layernorm = norm_factory(hidden_size)

    def forward(self, x_BTD: torch.Tensor, ctx) -> torch.Tensor:
        x_BTD = (
            x_BTD
            + self.self_attn(self.input_layernorm(x_BTD), ctx)
            * self.residual_multiplier
        )
        x_BTD = (
            x_BTD
            + self.mlp(self.post_attention_layernorm(x_BTD)) * self.residual_multiplier
        )
        return x_BTD

    def extra_repr(self) -> str:
        return f"residual_multiplier={self.residual_multiplier}"
