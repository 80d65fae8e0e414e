"""Checks shared by the Triton kernel tests (tests/runtime/test_triton_*.py)."""

from __future__ import annotations

import torch


def ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of x's dtype at |x| (one unit in the last place)."""
    a = x.abs()
    return torch.nextafter(a, torch.full_like(a, float("inf"))) - a


def assert_rounded_once(name: str, value: torch.Tensor, exact32: torch.Tensor, twin_value: torch.Tensor, dtype) -> None:
    """VALUE (a bf16 or fp16 kernel result) is fp32 math rounded once: within one ulp of the
    correctly rounded EXACT32 everywhere and equal to it nearly everywhere (a truncating cast
    would match only about half), and its error against EXACT32 is under twice that of the torch
    twin's TWIN_VALUE (which rounds after each operation)."""
    rounded = exact32.to(dtype)
    assert ((value - rounded).abs() <= ulp(rounded)).all(), name
    assert (value == rounded).float().mean() > 0.99, name
    our_err = (value.float() - exact32).abs().max()
    twin_err = (twin_value.float() - exact32).abs().max()
    assert twin_err > 0  # the comparison below means something
    assert our_err <= 2 * twin_err, (name, our_err, twin_err)
