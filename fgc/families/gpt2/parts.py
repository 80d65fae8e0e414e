"""GPT-2's own parts (transformers' GPT2LMHeadModel): the block with dropout on its two residual
branches, and the model with dropout on the embeddings and attention scaled by layer index.

The attention (`CausalSelfAttention` with biases and `attention_dropout`), the MLP (`MLP`, GELU),
the norms (torch's LayerNorm) and the learned positions (`LearnedPositionalEmbedding`) are the
component library's. State-dict names are fgc's; the family's tensor rules map them to GPT-2's
(`transformer.h.N.attn.c_attn`, ...).

Shape legend: B batch, T sequence, D hidden size.
"""

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from fgc.components.causal_lm import CausalLM
from fgc.components.layers import PreNormDecoderLayer
from fgc.components.positions import LayerContext


class GPT2DecoderLayer(PreNormDecoderLayer):
    """GPT-2's block (transformers' GPT2Block): `x + drop(attn(ln_1(x)))`, then
    `x + drop(mlp(ln_2(x)))`, with `residual_dropout` (GPT-2's resid_pdrop) on each branch's
    output while training. The norms are `input_layernorm` (ln_1) and `post_attention_layernorm`
    (ln_2), as in PreNormDecoderLayer."""

    def __init__(
        self,
        hidden_size: int,
        attention_factory: Callable[..., nn.Module],
        mlp_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        residual_dropout: float = 0.0,
    ):
        super().__init__(hidden_size, attention_factory, mlp_factory, norm_factory)
        if not 0.0 <= residual_dropout < 1.0:
            raise ValueError(
                f"GPT2DecoderLayer: residual_dropout must be in [0, 1), got {residual_dropout}"
            )
        self.residual_dropout = residual_dropout

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """`(B, T, D)`: attention, then the MLP, each added to the residual stream after dropout."""
        p = self.residual_dropout
        x_BTD = x_BTD + F.dropout(
            self.self_attn(self.input_layernorm(x_BTD), ctx), p, self.training
        )
        x_BTD = x_BTD + F.dropout(
            self.mlp(self.post_attention_layernorm(x_BTD)), p, self.training
        )
        return x_BTD


class GPT2CausalLM(CausalLM):
    """CausalLM as GPT-2 has it (transformers' GPT2LMHeadModel): `embedding_dropout` (GPT-2's
    embd_pdrop) on the sum of the token and position embeddings while training, and with
    `scale_attn_by_inverse_layer_idx` layer i's attention scores divided by `i + 1` besides
    their scale (its attention's `scaling`, or `head_dim ** -0.5`)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        positions: nn.Module,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        init_rules: tuple[tuple[str, float | str], ...] = (),
        embedding_dropout: float = 0.0,
        scale_attn_by_inverse_layer_idx: bool = False,
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
                f"GPT2CausalLM: embedding_dropout must be in [0, 1), got {embedding_dropout}"
            )
        self.embedding_dropout = embedding_dropout
        self.scale_attn_by_inverse_layer_idx = scale_attn_by_inverse_layer_idx
        if scale_attn_by_inverse_layer_idx:
            for i, layer in enumerate(self.model.layers):
                attn = layer.self_attn
                scale = (
                    attn.scaling if attn.scaling is not None else attn.head_dim**-0.5
                )
                # the same float arithmetic as transformers' GPT2Attention
                attn.scaling = scale / float(i + 1)

    def embed(
        self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor
    ) -> torch.Tensor:
        """`(B, T, D)`: the token plus position embeddings, with embedding dropout while training."""
        x_BTD = super().embed(input_ids_BT, position_ids_BT)
        return F.dropout(x_BTD, self.embedding_dropout, self.training)
