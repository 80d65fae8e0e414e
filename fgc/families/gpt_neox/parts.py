"""GPT-NeoX's own parts (transformers' GPTNeoXForCausalLM): the layer with a parallel residual
(or the sequential one) and dropout on its branches, and the model with dropout on the embeddings.

The attention (`CausalSelfAttention` with biases, partial rotary and `attention_dropout`), the MLP
(`MLP`, GELU), the norms (torch's LayerNorm) and the rotary positions are the component
library's. State-dict names are fgc's; the family's tensor rules map them to GPT-NeoX's
(`gpt_neox.layers.N.attention.query_key_value`, ...).

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from fgc.components.causal_lm import CausalLM
from fgc.components.positions import LayerContext


class GPTNeoXDecoderLayer(nn.Module):
    """GPT-NeoX's layer (transformers' GPTNeoXLayer). With `use_parallel_residual` the attention
    and the MLP both read the layer's input: `x + drop(attn(norm1(x))) + drop(mlp(norm2(x)))`;
    without, they follow each other: `h = x + drop(attn(norm1(x)))`, then
    `h + drop(mlp(norm2(h)))`. `hidden_dropout` is the dropout on each branch's output while
    training. The norms are `input_layernorm` and `post_attention_layernorm`, the attention
    `self_attn`, the MLP `mlp` (fgc's names)."""

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[..., nn.Module],
        mlp_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        use_parallel_residual: bool = True,
        hidden_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= hidden_dropout < 1.0:
            raise ValueError(
                f"GPTNeoXDecoderLayer: hidden_dropout must be in [0, 1), got {hidden_dropout}"
            )
        self.hidden_size = hidden_size
        self.use_parallel_residual = use_parallel_residual
        self.hidden_dropout = hidden_dropout
        self.self_attn = attention_factory(hidden_size=hidden_size)
        self.mlp = mlp_factory(hidden_size=hidden_size)
        self.input_layernorm = norm_factory(hidden_size)
        self.post_attention_layernorm = norm_factory(hidden_size)

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`(B, T, D)`: the layer's output, parallel or sequential as `use_parallel_residual` says."""
        p = self.hidden_dropout
        attn_BTD = F.dropout(
            self.self_attn(self.input_layernorm(x_BTD), ctx), p, self.training
        )
        if self.use_parallel_residual:
            mlp_BTD = F.dropout(
                self.mlp(self.post_attention_layernorm(x_BTD)), p, self.training
            )
            # summed in transformers' order
            return mlp_BTD + attn_BTD + x_BTD
        h_BTD = attn_BTD + x_BTD
        mlp_BTD = F.dropout(
            self.mlp(self.post_attention_layernorm(h_BTD)), p, self.training
        )
        return mlp_BTD + h_BTD

    def extra_repr(self) -> str:
        """The residual's form and the dropout, in the module's printout."""
        return f"use_parallel_residual={self.use_parallel_residual}, hidden_dropout={self.hidden_dropout}"


class GPTNeoXCausalLM(CausalLM):
    """CausalLM as GPT-NeoX has it (transformers' GPTNeoXForCausalLM): `embedding_dropout`
    (GPT-NeoX's hidden_dropout) on the token embeddings while training."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        positions: nn.Module,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        init_rules: tuple[tuple[str, float | str], ...] = (),
        embedding_dropout: float = 0.0,
    ):
        super().__init__(
            vocab_size,
            hidden_size,
            num_hidden_layers,
            layer_factory,
            norm_factory,
            positions,
            tie_word_embeddings=tie_word_embeddings,
            initializer_range=initializer_range,
            init_rules=init_rules,
        )
        if not 0.0 <= embedding_dropout < 1.0:
            raise ValueError(
                f"GPTNeoXCausalLM: embedding_dropout must be in [0, 1), got {embedding_dropout}"
            )
        self.embedding_dropout = embedding_dropout

    def embed(
        self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor
    ) -> torch.Tensor:
        """`(B, T, D)`: the token embeddings, with embedding dropout while training."""
        x_BTD = super().embed(input_ids_BT, position_ids_BT)
        return F.dropout(x_BTD, self.embedding_dropout, self.training)
