"""Choosing a kernel implementation: ``impl="auto"|"triton"|"torch"`` (CONTRACT §4)."""

from __future__ import annotations

IMPLS = ("auto", "triton", "torch")


def check_impl(impl: str) -> str:
    """Return the implementation to run for ``impl``; only the torch reference exists so far.

    ``auto`` resolves to ``torch``: it will pick Triton on CUDA once Triton kernels exist.
    """
    if impl == "triton":
        raise ValueError(
            "impl='triton' is not available: Triton kernels are not implemented in this version of fgc_runtime"
        )
    if impl not in IMPLS:
        raise ValueError(
            f"unknown impl {impl!r}: expected one of 'auto', 'triton', 'torch'"
        )
    return "torch"
