"""Attention: torch's ``scaled_dot_product_attention``, with one rule for the CPU.

On the CPU, torch's flash-attention kernel is slower in bf16 than in fp32: forward and backward
of a causal attention take about 4x as long at a head dim of 24, and as long at 64 (torch 2.13 on
an AVX512-BF16 CPU; docs/development.md, "The trainer"). So on the CPU, bf16 and fp16 queries,
keys and values are attended in fp32, outside autocast, and the output is cast back to their
dtype: faster, and more precise. On other devices SDPA runs as called.
Shape legend: B batch, H query heads, K key/value heads, T queries, S keys, E head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_UPCAST_ON_CPU = (torch.bfloat16, torch.float16)


def scaled_dot_product_attention(
    q_BHTE: torch.Tensor, k_BKSE: torch.Tensor, v_BKSE: torch.Tensor, **kwargs
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, **kwargs)``; on the CPU, bf16 and fp16 inputs are
    attended in fp32 and the output is returned in their dtype."""
    if q_BHTE.device.type == "cpu" and q_BHTE.dtype in _UPCAST_ON_CPU:
        with torch.autocast("cpu", enabled=False):
            y_BHTE = F.scaled_dot_product_attention(q_BHTE.float(), k_BKSE.float(), v_BKSE.float(), **kwargs)
        return y_BHTE.to(q_BHTE.dtype)
    return F.scaled_dot_product_attention(q_BHTE, k_BKSE, v_BKSE, **kwargs)
