"""OLMo 2's own parts: an attention whose QK-norm spans the whole query and key projections, and
a decoder layer that normalises each sublayer's output inside the residual (transformers'
Olmo2Attention and Olmo2DecoderLayer, with their parameter names).

Shape legend: B batch, T sequence, D hidden size, H query heads, K key/value heads, E head dim.
"""

from typing import Callable, Literal

import torch
from torch import nn

from fgc.components.attention import CausalSelfAttention
from fgc.components.positions import LayerContext
from fgc_runtime.kernels import scaled_dot_product_attention


class Olmo2Attention(CausalSelfAttention):
    """Grouped-query attention with OLMo 2's QK-norm: one norm over all H*E query channels
    (`q_norm`) and one over all K*E key channels (`k_norm`), applied to the projections before
    they are split into heads and rotated (Qwen3's QK-norm is per head instead).

    Because each norm spans every head, tensor parallelism cannot split the projections by
    heads: this part declares no tp_plan and stays whole on every tensor-parallel rank (the MLP
    beside it is still split).
    """

    # the norm's statistics need every head's channels: nothing here can be split by heads
    tp_plan = {}
    tp_divisible = ()

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        qk_norm_factory: Callable[..., nn.Module],
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
    ):
        super().__init__(
            hidden_size,
            num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
            attention_bias=attention_bias,
            kernel_impl=kernel_impl,
        )
        self.q_norm = qk_norm_factory(self.num_attention_heads * self.head_dim)
        self.k_norm = qk_norm_factory(self.num_key_value_heads * self.head_dim)

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # the norms see the whole projections, before the split into heads
        q_BTHE = self.q_norm(self.q_proj(x_BTD)).view(B, T, -1, self.head_dim)
        k_BTKE = self.k_norm(self.k_proj(x_BTD)).view(B, T, -1, self.head_dim)
        v_BTKE = self.v_proj(x_BTD).view(B, T, -1, self.head_dim)
        q_BHTE, k_BKTE = ctx.rotate(
            q_BTHE.transpose(1, 2), k_BTKE.transpose(1, 2), impl=self.kernel_impl
        )
        attn_mask_B1TS = ctx.attn_mask_B1TS
        # SDPA broadcasts the K key/value heads over the H query heads itself, without a repeat_kv
        # copy; the runtime's SDPA has the CPU rules of the component library's attention
        y_BHTE = scaled_dot_product_attention(
            q_BHTE,
            k_BKTE,
            v_BTKE.transpose(1, 2),
            attn_mask=attn_mask_B1TS,
            is_causal=attn_mask_B1TS is None,
            enable_gqa=self.num_key_value_heads != self.num_attention_heads,
        )
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


class Olmo2DecoderLayer(nn.Module):
    """OLMo 2's decoder layer: each sublayer's output is normalised before it joins the residual,
    `x + norm(attn(x))`, then `x + norm(mlp(x))`; no norm on the sublayers' inputs. Norms
    `post_attention_layernorm` and `post_feedforward_layernorm` (transformers' Olmo2DecoderLayer).
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
        x_BTD = x_BTD + self.post_attention_layernorm(self.self_attn(x_BTD, ctx))
        return x_BTD + self.post_feedforward_layernorm(self.mlp(x_BTD))
