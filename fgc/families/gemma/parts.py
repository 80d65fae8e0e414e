"""The Gemma families' own parts (Gemma 2 and Gemma 3; Gemma needs none): the sandwich-norm
decoder layer, and Gemma 3's two sets of rotary tables with the attention that picks its set.

Vendored into a package's model.py like the component library's parts: imports only torch and
the component library, module-level values are constants, names start with Gemma.

Shape legend: B batch, T sequence, D hidden size, E head dim.
"""

from typing import Callable, Literal

import torch
from torch import nn

from fgc.components.attention import CausalSelfAttention
from fgc.components.positions import LayerContext


class GemmaSandwichDecoderLayer(nn.Module):
    """Gemma 2's and Gemma 3's decoder layer: each sublayer's input and output are normed.

    `x + post_attention_layernorm(attn(input_layernorm(x)))`, then
    `x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`, with the four norms
    named as in transformers' Gemma2DecoderLayer, so checkpoints load as they are.
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
        self.pre_feedforward_layernorm = norm_factory(hidden_size)
        self.post_feedforward_layernorm = norm_factory(hidden_size)

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        x_BTD = x_BTD + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x_BTD), ctx)
        )
        x_BTD = x_BTD + self.post_feedforward_layernorm(
            self.mlp(self.pre_feedforward_layernorm(x_BTD))
        )
        return x_BTD


class GemmaLocalGlobalRotary(nn.Module):
    """Gemma 3's positions: two rotary embeddings, one for the sliding-window (local) layers and
    one for the full-attention (global) layers, as transformers' Gemma3RotaryEmbedding keeps one
    table per layer type (`rope_parameters["sliding_attention"]`, `["full_attention"]`).

    `tables(position_ids_BT)` gives both, keyed by layer type: `{"sliding_attention": (cos_BTE,
    sin_BTE), "full_attention": (cos_BTE, sin_BTE)}`, fp32; `GemmaLayerTypeAttention` picks its
    own. Like every rotary part it adds nothing to the embeddings and has no parameters.
    """

    def __init__(self, local_rotary: nn.Module, global_rotary: nn.Module):
        super().__init__()
        self.local_rotary = local_rotary
        self.global_rotary = global_rotary

    def embed(self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """X as it is: rotary positions act in the attention."""
        return x_BTD

    def tables(
        self, position_ids_BT: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Both sets of `(cos_BTE, sin_BTE)` tables, by the layer type that rotates with them."""
        return {
            "sliding_attention": self.local_rotary.tables(position_ids_BT),
            "full_attention": self.global_rotary.tables(position_ids_BT),
        }


class GemmaLayerTypeAttention(CausalSelfAttention):
    """The library's attention, rotating with the tables of its `layer_type` (Gemma 3): the
    `sliding_attention` or the `full_attention` set of a `GemmaLocalGlobalRotary`. With positions
    that give one set of tables (a plain rotary embedding), it rotates with that set.

    Every other argument is `CausalSelfAttention`'s (a sliding-window layer also gives its
    `sliding_window`; the layer type only picks the tables).
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        layer_type: Literal["sliding_attention", "full_attention"],
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        sliding_window: int | None = None,
        qk_norm_factory: Callable[..., nn.Module] | None = None,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
        scaling: float | None = None,
        attn_logit_softcapping: float | None = None,
    ):
        if layer_type not in ("sliding_attention", "full_attention"):
            raise ValueError(
                f"GemmaLayerTypeAttention: layer_type must be sliding_attention or full_attention, got {layer_type!r}"
            )
        super().__init__(
            hidden_size,
            num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            attention_bias=attention_bias,
            sliding_window=sliding_window,
            qk_norm_factory=qk_norm_factory,
            kernel_impl=kernel_impl,
            scaling=scaling,
            attn_logit_softcapping=attn_logit_softcapping,
        )
        self.layer_type = layer_type

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        tables = ctx.rotary_tables
        if isinstance(tables, dict):
            ctx = LayerContext(tables[self.layer_type], ctx.attn_mask_B1TS)
        return super().forward(x_BTD, ctx)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, layer_type={self.layer_type}"
