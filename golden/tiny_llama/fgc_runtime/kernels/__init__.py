"""Kernels with exact torch references (CONTRACT §4).

Every kernel takes ``impl="auto"|"triton"|"torch"``. This version has no Triton kernels: ``auto``
runs the torch references, and ``triton`` raises ValueError rather than silently falling back.
``fused_linear_cross_entropy`` also has ``impl="chunked"`` (torch, one chunk of logits at a time).
"""

from .cross_entropy import fused_linear_cross_entropy
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["rms_norm", "swiglu", "apply_rope", "fused_linear_cross_entropy"]
