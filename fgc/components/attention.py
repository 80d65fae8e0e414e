"""Causal self-attention with grouped-query heads and rotary positions.

Shape legend: B batch, T sequence, D hidden size, H query heads, K key/value heads,
E head dim (the `D` of the rotary tables, which are per head).
"""

import torch
from torch import nn
import torch.nn.functional as F

from fgc_runtime.kernels import apply_rope


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in transformers' LlamaAttention.

    Supports grouped-query attention (`num_key_value_heads` < `num_attention_heads`) and a head
    dim that is not hidden_size / heads. Projection names match Llama so checkpoints load as-is.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
    ):
        super().__init__()
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        if head_dim is None:
            if hidden_size % num_attention_heads != 0:
                raise ValueError(
                    f"CausalSelfAttention: num_attention_heads ({num_attention_heads}) must divide "
                    f"hidden_size ({hidden_size}) when head_dim is not given"
                )
            head_dim = hidden_size // num_attention_heads
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"CausalSelfAttention: num_key_value_heads ({num_key_value_heads}) must divide "
                f"num_attention_heads ({num_attention_heads})"
            )
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=attention_bias)

    def forward(self, x_BTD: torch.Tensor, cos_BTE: torch.Tensor, sin_BTE: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, self.num_attention_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        # The rotary tables are fp32; cast them so a bf16 model keeps bf16 q/k, as transformers does.
        q_BHTE, k_BKTE = apply_rope(q_BHTE, k_BKTE, cos_BTE.to(q_BHTE.dtype), sin_BTE.to(q_BHTE.dtype))
        # SDPA broadcasts the K key/value heads over the H query heads itself, without a repeat_kv copy.
        y_BHTE = F.scaled_dot_product_attention(
            q_BHTE,
            k_BKTE,
            v_BKTE,
            is_causal=True,
            enable_gqa=self.num_key_value_heads != self.num_attention_heads,
        )
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, self.num_attention_heads * self.head_dim)
        return self.o_proj(y_BTD)

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}"
        )
