"""SwiGLU in Triton: ``silu(gate) * up``, forward and backward, twin of ``swiglu_torch``.

Shape legend: N the number of elements of ``gate`` (and ``up``), any shape, flattened.

The operation is elementwise, so the kernels see ``gate``, ``up`` and the upstream gradient as flat
contiguous arrays of N elements, in blocks of ``BLOCK`` (masked at the end). All math is in fp32;
results are stored in the inputs' dtype. The torch twin in bf16/fp16 rounds twice (after ``silu``
and after the product); these kernels round once, so they can differ from it by one ulp.

Backward, with ``sig = sigmoid(gate)``:
    d_gate = dy * up * sig * (1 + gate * (1 - sig))
    d_up   = dy * gate * sig
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rounding import to_output

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per program: large enough to keep the GPU busy per launch, small enough for few registers.
_MAX_BLOCK = 1024


@triton.jit
def _swiglu_forward_kernel(gate_ptr, up_ptr, y_ptr, n_elements, BLOCK: tl.constexpr):
    # int64: program index times BLOCK can exceed 2**31 for large activations
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offsets, to_output(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    gate_ptr, up_ptr, dy_ptr, dgate_ptr, dup_ptr, n_elements, BLOCK: tl.constexpr
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dy * gate * sig
    tl.store(
        dgate_ptr + offsets, to_output(dgate, dgate_ptr.dtype.element_ty), mask=mask
    )
    tl.store(dup_ptr + offsets, to_output(dup, dup_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_elements: int) -> tuple[int, int, int]:
    """(BLOCK, num_warps, number of programs) for N elements."""
    block = min(_MAX_BLOCK, triton.next_power_of_2(n_elements))
    num_warps = 4 if block >= 512 else (2 if block >= 128 else 1)
    return block, num_warps, triton.cdiv(n_elements, block)


class SwiGLUFunction(torch.autograd.Function):
    """``silu(gate) * up`` with Triton forward and backward; inputs contiguous, same shape and dtype."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(gate)
        n_elements = gate.numel()
        if n_elements:
            block, num_warps, programs = _launch_config(n_elements)
            _swiglu_forward_kernel[(programs,)](
                gate, up, y, n_elements, BLOCK=block, num_warps=num_warps
            )
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        # The upstream gradient is often not contiguous (e.g. the expanded ones of `y.sum()`);
        # the flat kernel needs it contiguous, and one copy is cheap next to the matmuls around it.
        dy = dy.contiguous()
        dgate = torch.empty_like(gate)
        dup = torch.empty_like(up)
        n_elements = gate.numel()
        if n_elements:
            block, num_warps, programs = _launch_config(n_elements)
            _swiglu_backward_kernel[(programs,)](
                gate, up, dy, dgate, dup, n_elements, BLOCK=block, num_warps=num_warps
            )
        return dgate, dup


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` computed in fp32, returned in the inputs' dtype; differentiable.

    ``gate`` and ``up`` must have the same shape, dtype (fp32, bf16 or fp16) and device; no
    broadcasting. In the model they are outputs of ``nn.Linear`` and contiguous; a non-contiguous
    input is copied to a contiguous one first. The output is contiguous.
    """
    if not isinstance(gate, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise ValueError("swiglu_triton: gate and up must be tensors")
    if gate.shape != up.shape:
        raise ValueError(
            f"swiglu_triton: gate and up must have the same shape, got gate {tuple(gate.shape)} "
            f"and up {tuple(up.shape)}"
        )
    if gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu_triton: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}"
        )
    if gate.dtype not in _DTYPES:
        raise ValueError(
            f"swiglu_triton: dtype {gate.dtype} is not supported (expected float32, bfloat16 or float16)"
        )
    if gate.device != up.device:
        raise ValueError(
            f"swiglu_triton: gate and up must be on the same device, got {gate.device} and {up.device}"
        )
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())
