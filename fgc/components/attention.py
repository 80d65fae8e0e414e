"""Causal self-attention with grouped-query heads and rotary positions.

Shape legend: B batch, T sequence, D hidden size, H query heads, K key/value heads,
E head dim (the `D` of the rotary tables, which are per head), S key positions (= T).
"""

from typing import Callable, Literal

import torch
from torch import nn
import torch.nn.functional as F

from fgc.components.positions import LayerContext
from fgc_runtime.kernels import scaled_dot_product_attention


def sliding_window_causal_mask(
    seq_len: int, sliding_window: int, device=None
) -> torch.Tensor:
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
    - `use_rope`: False ignores the rotary tables (a layer without positions, as some of
      SmolLM3's); `rotary_dim`: only the first `rotary_dim` channels of each head rotate (partial
      rotary, GPT-NeoX's rotary_pct; the rotary tables are built for `rotary_dim`);
    - `qkv_bias`: biases on q, k and v (None: as `attention_bias`, which sets the output
      projection's; Qwen2 has them on q, k and v only);
    - `scaling`: the softmax scale (None: `head_dim ** -0.5`; Granite's attention_multiplier,
      Gemma 2's `query_pre_attn_scalar ** -0.5`);
    - `attn_logit_softcapping`: the attention scores soft-capped at c (`c * tanh(s / c)`, Gemma 2),
      computed in the open (SDPA cannot);
    - `attention_dropout`: dropout on the attention weights while training (GPT-2's attn_pdrop,
      GPT-NeoX's attention_dropout);
    - `kernel_impl`: the implementation of the rotary kernel (`fgc_runtime.kernels.apply_rope`):
      auto, torch or triton.
    `forward(x_BTD, ctx)` takes the forward's `LayerContext`: its rotary tables rotate the
    queries and keys, and its optional boolean `attn_mask_B1TS` (True: may attend) replaces the
    causal mask, e.g. the block-diagonal mask of packed documents; without one, and without a
    window shorter than the input, SDPA runs its causal kernel with no mask in memory.
    """

    # Tensor parallelism: the projections split by output features (each rank computes some
    # heads) and the one split by input features (the ranks' partial outputs are summed).
    tp_plan = {
        "q_proj": "colwise",
        "k_proj": "colwise",
        "v_proj": "colwise",
        "o_proj": "rowwise",
    }
    # the attributes a tensor-parallel degree must divide (each rank holds whole heads)
    tp_divisible = ("num_attention_heads", "num_key_value_heads")
    # the fgc_runtime.kernels it runs (through ctx.rotate), chosen by kernel_impl
    kernels = ("apply_rope",)

    def __init__(
        self,
        hidden_size: int,
        num_attention_heads: int,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_bias: bool = False,
        sliding_window: int | None = None,
        qk_norm_factory: Callable[..., nn.Module] | None = None,
        use_rope: bool = True,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
        qkv_bias: bool | None = None,
        scaling: float | None = None,
        attn_logit_softcapping: float | None = None,
        rotary_dim: int | None = None,
        attention_dropout: float = 0.0,
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
            raise ValueError(
                f"CausalSelfAttention: sliding_window must be at least 1, got {sliding_window}"
            )
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        if rotary_dim is not None and not (
            0 < rotary_dim <= head_dim and rotary_dim % 2 == 0
        ):
            raise ValueError(
                f"CausalSelfAttention: rotary_dim must be even and between 2 and head_dim ({head_dim}), got {rotary_dim}"
            )
        self.use_rope = use_rope
        self.kernel_impl = kernel_impl
        self.scaling = scaling
        self.attn_logit_softcapping = attn_logit_softcapping
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(
                f"CausalSelfAttention: attention_dropout must be in [0, 1), got {attention_dropout}"
            )
        self.attention_dropout = attention_dropout
        self.rotary_dim = None if rotary_dim == head_dim else rotary_dim
        qkv_bias = attention_bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(
            hidden_size, num_attention_heads * head_dim, bias=qkv_bias
        )
        self.k_proj = nn.Linear(
            hidden_size, num_key_value_heads * head_dim, bias=qkv_bias
        )
        self.v_proj = nn.Linear(
            hidden_size, num_key_value_heads * head_dim, bias=qkv_bias
        )
        self.o_proj = nn.Linear(
            num_attention_heads * head_dim, hidden_size, bias=attention_bias
        )
        self.q_norm = qk_norm_factory(head_dim) if qk_norm_factory is not None else None
        self.k_norm = qk_norm_factory(head_dim) if qk_norm_factory is not None else None

    def forward(self, x_BTD: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
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
        if self.use_rope and self.rotary_dim is not None:
            # partial rotary: the first rotary_dim channels of each head rotate, the rest pass
            r = self.rotary_dim
            q_rot, k_rot = ctx.rotate(
                q_BHTE[..., :r], k_BKTE[..., :r], impl=self.kernel_impl
            )
            q_BHTE = torch.cat((q_rot, q_BHTE[..., r:]), dim=-1)
            k_BKTE = torch.cat((k_rot, k_BKTE[..., r:]), dim=-1)
        elif self.use_rope:
            q_BHTE, k_BKTE = ctx.rotate(q_BHTE, k_BKTE, impl=self.kernel_impl)
        attn_mask_B1TS = ctx.attn_mask_B1TS
        if self.sliding_window is not None and self.sliding_window < T:
            window_TS = sliding_window_causal_mask(T, self.sliding_window, x_BTD.device)
            attn_mask_B1TS = (
                window_TS if attn_mask_B1TS is None else attn_mask_B1TS & window_TS
            )
        if self.attn_logit_softcapping is not None:
            y_BHTE = self._softcapped_attention(q_BHTE, k_BKTE, v_BKTE, attn_mask_B1TS)
        else:
            # SDPA broadcasts the K key/value heads over the H query heads itself, without a repeat_kv
            # copy; on the CPU, bf16 attention runs by query chunks when compiled, else in fp32
            # (faster there: fgc_runtime.kernels.attention)
            y_BHTE = scaled_dot_product_attention(
                q_BHTE,
                k_BKTE,
                v_BKTE,
                attn_mask=attn_mask_B1TS,
                is_causal=attn_mask_B1TS is None,
                dropout_p=self.attention_dropout if self.training else 0.0,
                scale=self.scaling,
                enable_gqa=self.num_key_value_heads != self.num_attention_heads,
            )
        y_BTD = y_BHTE.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(y_BTD)

    def _softcapped_attention(
        self, q_BHTE, k_BKTE, v_BKTE, attn_mask_B1TS
    ) -> torch.Tensor:
        """Attention with soft-capped scores, written out as transformers' Gemma 2 does: scores
        scaled, capped (`c * tanh(s / c)`), masked, softmax in fp32, then the weighted values.
        """
        H, K, T = q_BHTE.shape[1], k_BKTE.shape[1], q_BHTE.shape[2]
        k_BHTE = k_BKTE.repeat_interleave(H // K, dim=1)
        v_BHTE = v_BKTE.repeat_interleave(H // K, dim=1)
        scale = self.scaling if self.scaling is not None else self.head_dim**-0.5
        scores_BHTS = torch.matmul(q_BHTE, k_BHTE.transpose(2, 3)) * scale
        c = self.attn_logit_softcapping
        scores_BHTS = torch.tanh(scores_BHTS / c) * c
        if attn_mask_B1TS is None:
            attn_mask_B1TS = torch.ones(
                T, T, dtype=torch.bool, device=q_BHTE.device
            ).tril()
        scores_BHTS = scores_BHTS.masked_fill(
            ~attn_mask_B1TS, torch.finfo(scores_BHTS.dtype).min
        )
        weights_BHTS = torch.softmax(scores_BHTS, dim=-1, dtype=torch.float32).to(
            q_BHTE.dtype
        )
        weights_BHTS = F.dropout(
            weights_BHTS, p=self.attention_dropout, training=self.training
        )
        return torch.matmul(weights_BHTS, v_BHTE)

    def extra_repr(self) -> str:
        window = (
            f", sliding_window={self.sliding_window}"
            if self.sliding_window is not None
            else ""
        )
        rope = ", use_rope=False" if not self.use_rope else ""
        impl = f", kernel_impl={self.kernel_impl}" if self.kernel_impl != "auto" else ""
        return (
            f"heads={self.num_attention_heads}, kv_heads={self.num_key_value_heads}, "
            f"head_dim={self.head_dim}{window}{rope}{impl}"
        )
