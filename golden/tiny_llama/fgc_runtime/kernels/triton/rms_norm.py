"""RMSNorm in Triton, forward and backward; the twin of ``fgc_runtime.kernels.rms_norm.rms_norm_torch``.

``y = x * rstd * (offset + weight)`` with ``rstd = rsqrt(mean(x^2) + eps)`` over the last dim. All
math is fp32 (every load is upcast at once); ``y`` and ``dx`` are stored in ``x``'s dtype and
``dweight`` is returned in ``weight``'s dtype.

Shape legend: N rows (all leading dims of ``x`` flattened), D the normalised last dim, G the
programs of the backward kernel (each owns a block of consecutive rows).

Forward: one program per row; it also saves the row's rstd (fp32) for the backward.
Backward: with ``x_hat = x * rstd`` and ``g = dy * (offset + weight)``,
``dx = rstd * (g - x_hat * mean(g * x_hat))`` and ``dweight = sum over rows of dy * x_hat``. Each
program writes the fp32 partial ``dweight`` of its rows to a (G, D) buffer that torch sums: no
atomics, so outputs and gradients are bitwise reproducible for a given shape and device.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._rounding import to_output

# One row must fit one block of registers; hidden sizes of real models are far below this.
MAX_D = 65536
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Programs of the backward kernel off CUDA (Triton's interpreter): few, since each costs ~1 ms there.
INTERPRETER_PROGRAMS = 16


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,
    x_row_stride,
    w_ptr,
    y_ptr,
    y_row_stride,
    rstd_ptr,
    n_cols,
    eps,
    offset,
    BLOCK_D: tl.constexpr,
):
    # int64 before multiplying by a stride: row * stride can pass 2^31 on large activations.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    # Same order of products as the torch twin: (x * rstd) * (offset + w).
    y = (x * rstd) * (offset + w)
    tl.store(y_ptr + row * y_row_stride + cols, to_output(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,
    dy_row_stride,
    x_ptr,
    x_row_stride,
    w_ptr,
    rstd_ptr,
    dx_ptr,
    dx_row_stride,
    dw_partial_ptr,
    n_rows,
    n_cols,
    offset,
    rows_per_program,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < n_cols
    w_eff = offset + tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(
            tl.float32
        )
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(
            tl.float32
        )
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        if COMPUTE_DW:
            dw_acc += dy * x_hat
        if COMPUTE_DX:
            # Masked columns have dy = 0, hence g = 0 and x_hat = 0: they add nothing to the mean.
            g = dy * w_eff
            dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=0) / n_cols))
            tl.store(
                dx_ptr + row * dx_row_stride + cols,
                to_output(dx, dx_ptr.dtype.element_ty),
                mask=mask,
            )
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _num_warps(block_d: int) -> int:
    """Warps for a row of ``block_d`` elements: enough threads that each holds a few values."""
    if block_d <= 2048:
        return 4
    if block_d <= 8192:
        return 8
    return 16


@functools.lru_cache(maxsize=None)
def _backward_programs(device: torch.device) -> int:
    """How many programs share the backward's rows: one per SM on CUDA (fixed per device, which
    keeps the partial-sum order, hence dweight, reproducible)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an (N, D) tensor whose last dim has stride 1, without a copy where possible.

    A view works whenever the leading dims flatten into one row stride, which covers contiguous
    activations and slices of a wider tensor (e.g. one part of a fused projection). Otherwise
    (a transposed view, an expanded one, a last dim with stride != 1) the rows are copied once:
    the same amount of memory traffic as the kernel's own read.
    """
    d = t.shape[-1]
    if t.stride(-1) == 1 or d == 1:
        try:
            return t.view(-1, d)
        except RuntimeError:
            pass
    return t.contiguous().view(-1, d)


class _RMSNormFunction(torch.autograd.Function):
    """Autograd for the Triton RMSNorm: both passes in Triton, the dweight partials summed in torch."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset):
        x_ND = _as_rows(x)
        w_D = weight.contiguous()  # D elements: a copy, if any, is negligible
        n_rows, d = x_ND.shape
        y_ND = torch.empty((n_rows, d), dtype=x.dtype, device=x.device)
        rstd_N = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block_d = triton.next_power_of_2(d)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x_ND,
                x_ND.stride(0),
                w_D,
                y_ND,
                y_ND.stride(0),
                rstd_N,
                d,
                eps,
                offset,
                BLOCK_D=block_d,
                num_warps=_num_warps(block_d),
            )
        ctx.save_for_backward(x_ND, w_D, rstd_N)
        ctx.offset = offset
        return y_ND.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x_ND, w_D, rstd_N = ctx.saved_tensors
        compute_dx, compute_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, d = x_ND.shape
        dy_ND = _as_rows(dy)
        dx_ND = (
            torch.empty((n_rows, d), dtype=x_ND.dtype, device=x_ND.device)
            if compute_dx
            else None
        )
        programs = min(n_rows, _backward_programs(x_ND.device))
        rows_per_program = triton.cdiv(n_rows, programs) if n_rows > 0 else 0
        # Recount so that every program owns at least one row and writes its partial.
        programs = triton.cdiv(n_rows, rows_per_program) if n_rows > 0 else 0
        dw_partial_GD = (
            torch.empty((programs, d), dtype=torch.float32, device=x_ND.device)
            if compute_dw
            else None
        )
        block_d = triton.next_power_of_2(d)
        if programs > 0:
            _rms_norm_bwd_kernel[(programs,)](
                dy_ND,
                dy_ND.stride(0),
                x_ND,
                x_ND.stride(0),
                w_D,
                rstd_N,
                # An unused output gets a stand-in pointer that the kernel never writes.
                dx_ND if compute_dx else x_ND,
                dx_ND.stride(0) if compute_dx else 0,
                dw_partial_GD if compute_dw else rstd_N,
                n_rows,
                d,
                ctx.offset,
                rows_per_program,
                COMPUTE_DX=compute_dx,
                COMPUTE_DW=compute_dw,
                BLOCK_D=block_d,
                num_warps=_num_warps(block_d),
            )
        dx = dx_ND.view(dy.shape) if compute_dx else None
        dw = dw_partial_GD.sum(0).to(w_D.dtype) if compute_dw else None
        return dx, dw, None, None


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dim, scaled by ``offset + weight``: fp32 math, ``x.dtype`` out.

    ``x``: fp32, bf16 or fp16 with any leading dims; ``weight``: 1-D of size ``x.shape[-1]``, in
    any of those dtypes (its gradient comes back in its own dtype). Raises ValueError for inputs
    the kernel does not take.
    """
    if x.dim() == 0:
        raise ValueError(
            "rms_norm: x must have at least one dim (the normalised one), got a 0-d tensor"
        )
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight must be 1-D of size x.shape[-1] = {x.shape[-1]}, "
            f"got weight of shape {tuple(weight.shape)} for x of shape {tuple(x.shape)}"
        )
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in DTYPES:
            raise ValueError(
                f"rms_norm: the Triton kernel takes float32, bfloat16 or float16 {name}, got {t.dtype}; "
                "use impl='torch'"
            )
    if weight.device != x.device:
        raise ValueError(
            f"rms_norm: x is on {x.device} but weight is on {weight.device}"
        )
    if x.shape[-1] > MAX_D:
        raise ValueError(
            f"rms_norm: the Triton kernel normalises rows of at most {MAX_D} elements, "
            f"got last dim {x.shape[-1]}; use impl='torch'"
        )
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset))
