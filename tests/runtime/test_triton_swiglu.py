"""The Triton SwiGLU (forward and backward) against its torch twin ``swiglu_torch``.

Runs on CPU under the Triton interpreter; TRITON_INTERPRET must be set before triton is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fgc_runtime.kernels.swiglu import swiglu_torch  # noqa: E402
from fgc_runtime.kernels.triton.swiglu import swiglu_triton  # noqa: E402
from triton_checks import assert_rounded_once  # noqa: E402

# The interpreter runs the kernels on CPU tensors; with TRITON_INTERPRET=0 (a GPU machine), CUDA ones.
DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] not in ("", "0") else "cuda"

# fp32: both sides compute silu(g) * u in fp32; they differ only by how sigmoid's exp is evaluated
# and the order of two multiplications, a few ulp (~1e-7 relative). rtol 1e-5 leaves room for that
# and fails on any real formula error; atol 1e-6 covers results that cancel to near zero.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def run(fn, gate, up, dy=None):
    """fn(gate, up) on fresh leaf copies; returns (output, d_gate, d_up) for upstream gradient dy."""
    gate = gate.detach().clone().requires_grad_()
    up = up.detach().clone().requires_grad_()
    y = fn(gate, up)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return y.detach(), gate.grad, up.grad


def inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (3 * torch.randn(shape, generator=g)).to(
        dtype
    )  # wide enough to reach sigmoid's tails
    up = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return gate.to(DEVICE), up.to(DEVICE), dy.to(DEVICE)


@pytest.mark.parametrize("shape", [(5, 7, 431), (13, 96), (1, 1000), (300,)])
def test_fp32_matches_twin(shape):
    gate, up, dy = inputs(shape, torch.float32, 0)
    y, dgate, dup = run(swiglu_triton, gate, up, dy)
    y_ref, dgate_ref, dup_ref = run(swiglu_torch, gate, up, dy)
    assert y.shape == shape and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    torch.testing.assert_close(dgate, dgate_ref, **FP32_TOL)
    torch.testing.assert_close(dup, dup_ref, **FP32_TOL)


@pytest.mark.parametrize(
    "dtype,shape", [(torch.bfloat16, (3, 5, 431)), (torch.float16, (37, 100))]
)
def test_half_precision_rounds_once_and_beats_twin(dtype, shape):
    gate, up, dy = inputs(shape, dtype, 1)
    ours = run(swiglu_triton, gate, up, dy)
    assert all(t.dtype == dtype for t in ours)
    # the exact answer for these (rounded) inputs: computed in fp32
    exact = run(swiglu_torch, gate.float(), up.float(), dy.float())
    twin = run(swiglu_torch, gate, up, dy)  # rounds to dtype after each op
    for name, value, exact32, twin_value in zip(
        ("y", "d_gate", "d_up"), ours, exact, twin
    ):
        assert_rounded_once(name, value, exact32, twin_value, dtype)


def test_non_contiguous_inputs():
    # e.g. a transposed view: the wrapper copies it to a contiguous tensor and grads flow back
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(96, 13, generator=g).to(DEVICE).t()
    up = torch.randn(13, 192, generator=g).to(DEVICE)[:, ::2]
    assert not gate.is_contiguous() and not up.is_contiguous()
    y, dgate, dup = run(swiglu_triton, gate, up)  # y.backward(ones): dy contiguous
    y_ref, dgate_ref, dup_ref = run(swiglu_torch, gate, up)
    torch.testing.assert_close(y, y_ref, **FP32_TOL)
    torch.testing.assert_close(dgate, dgate_ref, **FP32_TOL)
    torch.testing.assert_close(dup, dup_ref, **FP32_TOL)


def test_expanded_upstream_gradient():
    # y.sum().backward() hands the kernel an expanded (stride-0) gradient
    gate, up, _ = inputs((4, 50), torch.float32, 3)
    grads = []
    for fn in (swiglu_triton, swiglu_torch):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        fn(g, u).sum().backward()
        grads.append((g.grad, u.grad))
    torch.testing.assert_close(grads[0], grads[1], **FP32_TOL)


def test_only_one_input_requires_grad():
    gate, up, dy = inputs((6, 33), torch.float32, 4)
    g = gate.clone().requires_grad_()
    swiglu_triton(g, up).backward(dy)
    g_ref = gate.clone().requires_grad_()
    swiglu_torch(g_ref, up).backward(dy)
    torch.testing.assert_close(g.grad, g_ref.grad, **FP32_TOL)


def test_deterministic():
    gate, up, dy = inputs((7, 129), torch.bfloat16, 5)
    first = run(swiglu_triton, gate, up, dy)
    second = run(swiglu_triton, gate, up, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_input():
    gate = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    up = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    y = swiglu_triton(gate, up)
    y.sum().backward()
    assert y.shape == (0, 8) and gate.grad.shape == (0, 8)


@pytest.mark.parametrize(
    "gate,up,message",
    [
        (
            torch.randn(2, 3, 8),
            torch.randn(2, 3, 9),
            "swiglu_triton: gate and up must have the same shape, got gate (2, 3, 8) and up (2, 3, 9)",
        ),
        (
            torch.randn(4, 8),
            torch.randn(8),  # the twin would broadcast; the kernel does not
            "swiglu_triton: gate and up must have the same shape",
        ),
        (
            torch.randn(4, 8),
            torch.randn(4, 8, dtype=torch.bfloat16),
            "swiglu_triton: gate and up must have the same dtype, got torch.float32 and torch.bfloat16",
        ),
        (
            torch.randn(4, 8, dtype=torch.float64),
            torch.randn(4, 8, dtype=torch.float64),
            "swiglu_triton: dtype torch.float64 is not supported",
        ),
    ],
)
def test_bad_inputs_raise(gate, up, message):
    with pytest.raises(ValueError) as excinfo:
        swiglu_triton(gate, up)
    assert str(excinfo.value).startswith(message)


class TinyMLP(nn.Module):
    """A Llama feed-forward block with a pluggable swiglu."""

    def __init__(self, swiglu_fn, hidden=16, intermediate=43):
        super().__init__()
        self.swiglu_fn = swiglu_fn
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x_BTD):
        return self.down_proj(
            self.swiglu_fn(self.gate_proj(x_BTD), self.up_proj(x_BTD))
        )


def test_training_step_in_module_matches_twin():
    torch.manual_seed(6)
    ours = TinyMLP(swiglu_triton).to(DEVICE)
    twin = copy.deepcopy(ours)
    twin.swiglu_fn = swiglu_torch
    x = torch.randn(2, 9, 16, device=DEVICE)
    target = torch.randn(2, 9, 16, device=DEVICE)
    losses = []
    for module in (ours, twin):
        loss = nn.functional.mse_loss(module(x), target)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **FP32_TOL)
    for (name, p), p_twin in zip(ours.named_parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_twin.grad, **FP32_TOL, msg=name)
