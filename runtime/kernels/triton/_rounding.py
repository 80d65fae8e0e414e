"""Casting fp32 results to a kernel's output dtype, rounding to nearest even on every backend.

GPUs round fp32 -> bf16 to nearest even; Triton's CPU interpreter (``TRITON_INTERPRET=1``, used by
the tests) truncates instead. ``to_output`` rounds to nearest even by hand for bf16, after which
the cast is exact, so the interpreter gives the GPU's bits and the tests check what GPUs compute.
The cost on a GPU is a few integer ops per stored element. fp16 and fp32 casts round correctly
on both already.
"""

import triton
import triton.language as tl


@triton.jit
def to_output(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` (rounded to nearest even)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # add half an ulp of bf16, minus one unless the kept part is odd (ties go to even), then
        # drop the low 16 bits; inf stays inf and NaN stays NaN (its high mantissa bit is set)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
