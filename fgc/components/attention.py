"""Causal self-attention with grouped-query heads and rotary positions.

Shape legend: B batch, T sequence, D hidden size, H query heads, K key/value heads,
E head dim (the `D` of the rotary tables, which are per head), S key positions (= T).
"""

from typing import Callable, Literal

import torch
from torch import nn
import torch.nn.functional as F

from fgc_runtime.kernels import apply_rope


def sliding_window_causal_mask(seq_len: int, sliding_window: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query t may attend key s: `t - sliding_window < s <= t`.

    A token sees itself and the `sliding_window - 1` tokens before it, as in transformers'
    Mistral (`kv_idx > q_idx - sliding_window`).
    """
    q_T1 = torch.arange(seq_len, device=device)[:, None]
    k_1S = torch.arange(seq_len, device=device)[None, :]
    return (k_1S <= q_T1) & (k_1S > q_T1 - sliding_window)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention as in transformers' LlamaAttention, over SDPA.

    Supports grouped-query attention (`num_key_value_heads` < `num_attention_heads`) and a head
    dim that is not hidden_size / heads. Projection names match Llama so checkpoints load as-is.
    Options, each off by default:
    - `sliding_window`: each token attends to itself and the `sliding_window - 1` tokens before
      it (Mistral);
    - `qk_norm_factory`: a norm over each head's channels applied to queries and keys before the
      rotation, built as `qk_norm_factory(head_dim)` and named `q_norm`/`k_norm` (Qwen3);
    - `kernel_impl`: the implementation of the rotary kernel (`fgc_runtime.kernels.apply_rope`):
      auto, torch or triton.
    `forward` takes an optional boolean `attn_mask_B1TS` (True: may attend) that replaces the
    causal mask, e.g. the block-diagonal mask of packed documents; without one, and without a
    window shorter than the input, SDPA runs its causal kernel with no mask in memory.
    """

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        sliding_window: int | None = None,
        qk_norm_factory: Callable[..., nn.Module] | None = None,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
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
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"CausalSelfAttention: sliding_window must be at least 1, got {sliding_window}")
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.kernel_impl = kernel_impl
        self.q_proj = nn.Linear(hidden_size, num_attention_heads * head_dim, bias=attention_bias)
        self.k_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.v_proj = nn.Linear(hidden_size, num_key_value_heads * head_dim, bias=attention_bias)
        self.o_proj = nn.Linear(num_attention_heads * head_dim, hidden_size, bias=attention_bias)
        self.q_norm = qk_norm_factory(head_dim) if qk_norm_factory is not None else None
        self.k_norm = qk_norm_factory(head_dim) if qk_norm_factory is not None else None

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BTE: torch.Tensor,
        sin_BTE: torch.Tensor,
        attn_mask_B1TS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        # -1: under tensor parallelism a rank's projections give only its share of the heads
        q_BTHE = self.q_proj(x_BTD).view(B, T, -1, self.head_dim)
        k_BTKE = self.k_proj(x_BTD).view(B, T, -1, self.head_dim)
        v_BTKE = self.v_proj(x_BTD).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            # QK-norm normalises each head's E channels, before the rotation (Qwen3).
            q_BTHE, k_BTKE = self.q_norm(q_BTHE), self.k_norm(k_BTKE)
        q_BHTE = q_BTHE.transpose(1, 2)
        k_BKTE = k_BTKE.transpose(1, 2)
        v_BKTE = v_BTKE.transpose(1, 2)
        # The rotary tables are fp32; cast them so a bf16 model keeps bf16 q/k, as transformers does.
        q_BHTE, k_BKTE = apply_rope(
            q_BHTE, k_BKTE, cos_BTE.to(q_BHTE.dtype), sin_BTE.to(q_BHTE.dtype), impl=self.kernel_impl
        )
        if self.sliding_window is not None and self.sliding_window < T:
            window_TS = sliding_window_causal_mask(T, self.sliding_window, x_BTD.device)
            attn_mask_B1TS = window_TS if attn_mask_B1TS is None else attn_mask_B1TS & window_TS
        # SDPA broadcasts the K key/value heads over the H query heads itself, without a repeat_kv copy.
        y_BHTE = F.scaled_dot_product_attention(
            q_BHTE,
            k_BKTE,
            v_BKTE,
            attn_mask=attn_mask_B1TS,
            is_causal=attn_mask_B1TS is None,
            enable_gqa=self.num_key_value_heads != self.num_attention_heads,
        )
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y_BTD)

    def extra_repr(self) -> str:
        window = f", sliding_window={self.sliding_window}" if self.sliding_window is not None else ""
        impl = f", kernel_impl={self.kernel_impl}" if self.kernel_impl != "auto" else ""
        return (
            f"heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}{window}{impl}"
        )
