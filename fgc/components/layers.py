"""Transformer decoder layers, built from swappable attention, MLP and norm factories.

A layer is called as `layer(x_BTD, ctx)`, with the forward's `LayerContext` (the rotary tables
of the positions and the attention mask), which it hands to its attention as it is.

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Callable

import torch
from torch import nn

from fgc.components.positions import LayerContext


class PreNormDecoderLayer(nn.Module):
    """Pre-norm residual decoder layer, as in transformers' LlamaDecoderLayer.

    `x + attn(norm(x))`, then `x + mlp(norm(x))`. Each factory is called here, so every layer gets
    its own attention, MLP and norms; the configs choose their types.
    """

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[..., nn.Module],
        mlp_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.self_attn = attention_factory(hidden_size=hidden_size)
        self.mlp = mlp_factory(hidden_size=hidden_size)
        self.input_layernorm = norm_factory(hidden_size)
        self.post_attention_layernorm = norm_factory(hidden_size)

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), ctx)
        x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))
        return x_BTD


class PostNormDecoderLayer(nn.Module):
    """Post-norm residual decoder layer, the order of the original Transformer.

    `norm(x + attn(x))`, then `norm(x + mlp(x))`: the norm follows each residual addition, so
    the stream between layers is normalised. Takes the same factories as PreNormDecoderLayer.
    """

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[..., nn.Module],
        mlp_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.self_attn = attention_factory(hidden_size=hidden_size)
        self.mlp = mlp_factory(hidden_size=hidden_size)
        self.post_attention_layernorm = norm_factory(hidden_size)
        self.post_feedforward_layernorm = norm_factory(hidden_size)

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        x_BTD = self.post_attention_layernorm(x_BTD + self.self_attn(x_BTD, ctx))
        x_BTD = self.post_feedforward_layernorm(x_BTD + self.mlp(x_BTD))
        return x_BTD
