"""Kernels with exact torch twins (docs/package.md, kernels).

Every kernel takes ``impl="auto"|"triton"|"torch"`` (``_impl.check_impl``). ``rms_norm``,
``swiglu`` and ``apply_rope`` have Triton kernels (``fgc_runtime.kernels.triton``, imported only
when asked for); ``auto`` runs the torch twins in this version. ``fused_linear_cross_entropy``
has ``impl="chunked"`` (torch, one chunk of logits at a time) and ``impl="triton"`` (the same
chunks, the work between the matmuls in one Triton kernel); ``auto`` is the reference, and fgc's
select-kernels pass picks at build time. ``scaled_dot_product_attention`` is torch's SDPA with
two rules for the CPU (faster there, ``attention.py``): in compiled code, bf16 causal
self-attention runs by query chunks (``causal_attention_by_query_chunks``); other bf16 and fp16
attention runs in fp32.
"""

from .attention import causal_attention_by_query_chunks, scaled_dot_product_attention
from .cross_entropy import fused_linear_cross_entropy
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = [
    "rms_norm",
    "swiglu",
    "apply_rope",
    "fused_linear_cross_entropy",
    "scaled_dot_product_attention",
    "causal_attention_by_query_chunks",
]
