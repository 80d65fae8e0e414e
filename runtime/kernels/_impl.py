"""Choosing a kernel implementation: ``impl="auto"|"triton"|"torch"`` (docs/package.md, kernels).

- ``torch``: the torch twin, on any device (the reference every other implementation is tested
  against).
- ``triton``: fgc_runtime's Triton kernels (``fgc_runtime.kernels.triton``), imported only then.
  They need the ``triton`` package and CUDA tensors; with ``TRITON_INTERPRET=1`` in the
  environment (set before triton is imported) they run on CPU tensors in Triton's interpreter,
  which is how the test suite checks them.
- ``auto``: the torch twin, on every device. The Triton kernels are tested against their twins in
  the interpreter, and were checked and timed once on an H200 (docs/development.md), where they
  beat the eager twins; ``auto`` does not pick them yet. Ask for them explicitly with
  ``impl="triton"`` (in a config: ``-D kernel_impl=triton``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

IMPLS = ("auto", "triton", "torch")


def triton_interpreting() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``): kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_impl(impl: str, *tensors: torch.Tensor) -> str:
    """The implementation to run for ``impl`` on ``tensors``: ``"torch"`` or ``"triton"``.

    Raises ValueError for an unknown ``impl``, and for ``triton`` where it cannot run: without
    the triton package, or on tensors that are not on CUDA (outside the interpreter).
    """
    return check_impl_devices(impl, {t.device.type for t in tensors})


def check_impl_devices(impl: str, devices: set[str]) -> str:
    """:func:`check_impl` for tensors on DEVICES (device types, e.g. ``{"cuda"}``)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}: expected one of 'auto', 'triton', 'torch'")
    if impl != "triton":
        return "torch"
    if importlib.util.find_spec("triton") is None:
        raise ValueError("impl='triton' needs the triton package (pip install triton), which is not installed")
    if devices - {"cuda"} and not triton_interpreting():
        raise ValueError(
            f"impl='triton' runs on CUDA tensors, got {', '.join(sorted(devices - {'cuda'}))} ones "
            "(TRITON_INTERPRET=1 runs the kernels on the CPU in Triton's interpreter, slowly: for tests); "
            "use impl='torch' or 'auto'"
        )
    return "triton"


def triton_kernel(module: str, name: str):
    """``fgc_runtime.kernels.triton.MODULE.NAME``, imported on first use (it imports triton).

    Imported by name rather than with an import statement, so that the flat copy of the kernels
    in Hugging Face remote code (``fgc_runtime.hf``), which has no Triton kernels, names no module
    it lacks.
    """
    return getattr(importlib.import_module(f"{__package__}.triton.{module}"), name)
