"""``to_output``, the fp32 -> output dtype cast of fgc_runtime's Triton kernels, rounds like torch."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fgc_runtime.kernels.triton._rounding import to_output  # noqa: E402

INTERPRETING = os.environ["TRITON_INTERPRET"] not in ("", "0")
DEVICE = "cpu" if INTERPRETING else "cuda"


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(y_ptr + offsets, to_output(x, y_ptr.dtype.element_ty), mask=mask)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cast_is_bitwise_torchs(dtype):
    g = torch.Generator().manual_seed(0)
    one = 1.0
    special = torch.tensor(
        [
            one + 2**-8,  # bf16 tie, kept part even: rounds down
            one + 3 * 2**-8,  # bf16 tie, kept part odd: rounds up
            one + 2**-8 + 2**-20,  # just above a tie: rounds up
            -(one + 3 * 2**-8),
            3.4e38,  # rounds to inf in bf16 (and overflows fp16)
            -3.4e38,
            float("inf"),
            float("-inf"),
            0.0,
            -0.0,
            65519.0,  # the largest value fp16 rounds down, not to inf
        ]
    )
    x = torch.cat(
        [special, torch.randn(3000, generator=g), 1e4 * torch.randn(1000, generator=g)]
    )
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)  # numpy (the interpreter) warns on fp16 overflow
    if not INTERPRETING:
        # GPUs also get random bit patterns (NaNs, subnormals) the interpreter mishandles
        x = torch.cat(
            [
                x,
                torch.randint(-(2**31), 2**31 - 1, (4000,), generator=g).view(
                    torch.float32
                ),
            ]
        )
    x = x.to(DEVICE)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    _cast_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    expected = x.to(dtype)
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(bits(y)[~nan], bits(expected)[~nan])


def test_nan_stays_nan_in_bf16():
    x = torch.tensor([float("nan"), -float("nan")], device=DEVICE)
    y = torch.empty(2, dtype=torch.bfloat16, device=DEVICE)
    _cast_kernel[(1,)](x, y, 2, BLOCK=2)
    assert y.isnan().all()
