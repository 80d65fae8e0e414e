"""Kernels with exact torch references (CONTRACT §4).

Every kernel takes ``impl="auto"|"triton"|"torch"``. This version has only the torch references:
``auto`` runs them, and ``triton`` raises ValueError rather than silently falling back.
"""

from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu

__all__ = ["rms_norm", "swiglu", "apply_rope"]
