"""The Triton RMSNorm (forward and backward) against its torch twin, in Triton's interpreter on CPU."""

import os

# Before torch/triton are imported: Triton reads it once, at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

pytest.importorskip("triton")

from fgc_runtime.kernels.rms_norm import rms_norm_torch  # noqa: E402
from fgc_runtime.kernels.triton.rms_norm import _as_rows, rms_norm_triton  # noqa: E402

# fp32 tolerance: kernel and twin both compute in fp32 and differ only in the order of the sum of
# squares and in rsqrt's rounding (a few fp32 ulps, ~1e-7 relative); 1e-5 leaves room for that
# while any real error (eps or offset dropped, mean over the padded block) is >= 1e-3 relative.
# atol covers gradients that cancel to near zero.
RTOL, ATOL = 1e-5, 1e-6


def run(fn, x, w, eps, offset, dy):
    """Output and gradients of ``fn`` on fresh leaf copies of ``x`` and ``w`` (fp32 kept as is)."""
    x = x.detach().clone().requires_grad_(x.requires_grad)
    w = w.detach().clone().requires_grad_(w.requires_grad)
    y = fn(x, w, eps, offset)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def ulp(ref32, dtype):
    """The spacing of ``dtype`` numbers at ``|ref32|`` (ref32 in fp32)."""
    mantissa_bits = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    _, exponent = torch.frexp(ref32.abs())
    return torch.ldexp(torch.ones_like(ref32), exponent - mantissa_bits)


def assert_within_one_ulp(out, ref32, what):
    """``out`` (bf16/fp16) is within one of its ulps of the fp32 value ``ref32``, plus the fp32
    tolerance: the kernel's fp32 result may differ from the twin's by that, then rounding to the
    output dtype adds at most half an ulp."""
    assert out.dtype in (torch.bfloat16, torch.float16)
    err = (out.float() - ref32).abs()
    allowed = ulp(ref32, out.dtype) + RTOL * ref32.abs() + ATOL
    assert (
        err <= allowed
    ).all(), f"{what}: max excess {(err - allowed).max().item():.3g}"


@pytest.mark.parametrize(
    "shape, eps, offset",
    [
        ((5, 7, 123), 1e-6, 0.0),  # 3-D, D not a power of two
        ((5, 7, 123), 1e-5, 1.0),  # Gemma-style offset
        ((37, 96), 1e-5, 0.0),  # 2-D
        ((1, 300), 1e-6, 1.0),  # a single row, masked tail in a 512 block
        ((3, 4, 1), 1e-6, 0.0),  # D = 1
    ],
)
def test_fp32_matches_twin(shape, eps, offset):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(shape[-1], requires_grad=True)
    dy = torch.randn(shape)
    y, dx, dw = run(rms_norm_triton, x, w, eps, offset, dy)
    y_ref, dx_ref, dw_ref = run(rms_norm_torch, x, w, eps, offset, dy)
    assert y.dtype == torch.float32 and y.shape == shape
    torch.testing.assert_close(y, y_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dx, dx_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(dw, dw_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "dtype, w_dtype, offset",
    [
        (torch.bfloat16, torch.float32, 0.0),  # fp32 master weight, bf16 activations
        (torch.bfloat16, torch.bfloat16, 1.0),
        (torch.float16, torch.float16, 0.0),
    ],
)
def test_low_precision_within_one_ulp_of_fp32_twin(dtype, w_dtype, offset):
    torch.manual_seed(1)
    shape = (4, 9, 200)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = (1 + 0.5 * torch.randn(200)).to(w_dtype).requires_grad_()
    dy = torch.randn(shape, dtype=dtype)
    y, dx, dw = run(rms_norm_triton, x, w, 1e-5, offset, dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (dtype, dtype, w_dtype)
    # The reference: the twin on the same values in fp32, without rounding its results.
    y32, dx32, dw32 = run(
        rms_norm_torch, x.float(), w.float(), 1e-5, offset, dy.float()
    )
    assert_within_one_ulp(y, y32, "y")
    assert_within_one_ulp(dx, dx32, "dx")
    if w_dtype == torch.float32:
        torch.testing.assert_close(dw, dw32, rtol=RTOL, atol=ATOL)
    else:
        assert_within_one_ulp(dw, dw32, "dweight")


def test_slice_of_fused_projection_is_read_in_place():
    """A slice of a wider tensor (one part of a fused qkv projection) is normalised through its
    row stride, without a copy."""
    torch.manual_seed(2)
    qkv = torch.randn(6, 10, 3 * 64)
    x = qkv[..., 64:128]
    rows = _as_rows(x)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (192, 1)
    x.requires_grad_()
    w = torch.randn(64, requires_grad=True)
    dy = torch.randn(6, 10, 64)
    for got, want in zip(
        run(rms_norm_triton, x, w, 1e-6, 0.0, dy),
        run(rms_norm_torch, x, w, 1e-6, 0.0, dy),
    ):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["transposed", "strided_last_dim"])
def test_non_contiguous_inputs_and_grads(layout):
    """Inputs whose rows cannot share one stride are copied once; a non-contiguous upstream
    gradient (here through a transpose of the output) works too."""
    torch.manual_seed(3)
    if layout == "transposed":
        x = torch.randn(2, 10, 4, 24).transpose(
            1, 2
        )  # (B, T, H, E) viewed as (B, H, T, E)
    else:
        x = torch.randn(2, 4, 10, 48)[..., ::2]
    x.requires_grad_()
    w = torch.randn(24, requires_grad=True)
    g = torch.randn(4, 2, 10, 24)

    def loss_of(fn):
        xl = x.detach().clone().requires_grad_()
        wl = w.detach().clone().requires_grad_()
        # transpose(0, 1) makes the gradient reaching the norm a non-contiguous view
        (fn(xl, wl, 1e-6, 1.0).transpose(0, 1) * g).sum().backward()
        return xl.grad, wl.grad

    assert not x.is_contiguous()
    torch.testing.assert_close(
        rms_norm_triton(x, w), rms_norm_torch(x, w), rtol=RTOL, atol=ATOL
    )
    for got, want in zip(loss_of(rms_norm_triton), loss_of(rms_norm_torch)):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("needs", ["x", "weight"])
def test_gradient_only_for_inputs_that_need_one(needs):
    torch.manual_seed(4)
    x = torch.randn(20, 33, requires_grad=needs == "x")
    w = torch.randn(33, requires_grad=needs == "weight")
    dy = torch.randn(20, 33)
    _, dx, dw = run(rms_norm_triton, x, w, 1e-6, 0.0, dy)
    _, dx_ref, dw_ref = run(rms_norm_torch, x, w, 1e-6, 0.0, dy)
    got, want = (dx, dx_ref) if needs == "x" else (dw, dw_ref)
    assert (dw if needs == "x" else dx) is None
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_deterministic():
    """100 rows: the backward splits them over several programs, whose dweight partials are summed
    in a fixed order, so repeated calls agree bit for bit."""
    torch.manual_seed(5)
    x = torch.randn(4, 25, 77, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(77, requires_grad=True)
    dy = torch.randn(4, 25, 77, dtype=torch.bfloat16)
    first = run(rms_norm_triton, x, w, 1e-6, 1.0, dy)
    second = run(rms_norm_triton, x, w, 1e-6, 1.0, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = rms_norm_triton(x, w)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16))


@pytest.mark.parametrize(
    "x_shape, w_shape, x_dtype, message",
    [
        (
            (4, 64),
            (63,),
            torch.float32,
            r"weight must be 1-D of size x.shape\[-1\] = 64, got weight of shape \(63,\)",
        ),
        (
            (4, 64),
            (1, 64),
            torch.float32,
            r"weight must be 1-D of size x.shape\[-1\] = 64, got weight of shape \(1, 64\)",
        ),
        ((), (1,), torch.float32, "x must have at least one dim"),
        (
            (4, 64),
            (64,),
            torch.float64,
            "takes float32, bfloat16 or float16 x, got torch.float64",
        ),
    ],
)
def test_bad_inputs_raise_value_error(x_shape, w_shape, x_dtype, message):
    with pytest.raises(ValueError, match=message):
        rms_norm_triton(torch.randn(x_shape, dtype=x_dtype), torch.randn(w_shape))


class TinyNet(nn.Module):
    """Linear -> RMSNorm (learned weight) -> Linear, with the norm function swappable."""

    def __init__(self, norm_fn):
        super().__init__()
        self.norm_fn = norm_fn
        self.up = nn.Linear(16, 40)
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(40))
        self.down = nn.Linear(40, 8)

    def forward(self, x):
        return self.down(self.norm_fn(self.up(x), self.norm_weight, 1e-5, 0.0))


def test_training_step_in_a_module():
    """Two SGD steps of a tiny module: parameter gradients and losses match the torch twin's."""
    torch.manual_seed(6)
    net = TinyNet(rms_norm_triton)
    ref = TinyNet(rms_norm_torch)
    ref.load_state_dict(net.state_dict())
    x, target = torch.randn(3, 11, 16), torch.randn(3, 11, 8)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (net, ref)]
    for _ in range(2):
        losses = []
        for model, opt in zip((net, ref), opts):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), target)
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=RTOL, atol=ATOL)
        for (name, p), p_ref in zip(net.named_parameters(), ref.parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(
                p.grad, p_ref.grad, rtol=RTOL, atol=ATOL, msg=name
            )
        for opt in opts:
            opt.step()
