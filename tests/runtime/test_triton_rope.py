"""The Triton rotary embedding (forward and backward) against its torch twin ``apply_rope_torch``.

q and k are built as the model builds them: a linear output viewed as (B, T, H, D) and transposed
to (B, H, T, D), so not contiguous. Gradients are compared on those linear outputs.
Runs on CPU under the Triton interpreter; TRITON_INTERPRET must be set before triton is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402

from fgc_runtime.kernels.rope import apply_rope_torch  # noqa: E402
from fgc_runtime.kernels.triton.rope import apply_rope_triton  # noqa: E402
from triton_checks import assert_rounded_once  # noqa: E402

# The interpreter runs the kernels on CPU tensors; with TRITON_INTERPRET=0 (a GPU machine), CUDA ones.
DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] not in ("", "0") else "cuda"

# fp32: each output element is x1*c - x2*s (two products and a sum) on both sides; they may differ
# by the rounding of one fused multiply-add (GPU) or not at all (interpreter). rtol 1e-5 is far
# above that and far below any wrong index or sign; atol 1e-6 covers results that cancel to ~0.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)


def rotary_tables(B, T, D, dtype, *, per_batch=False, seed=0):
    """cos/sin (B, T, D) the model's way (each frequency for both halves), expanded over the batch
    (stride 0) unless ``per_batch`` (packed documents: each row its own positions)."""
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    if per_batch:
        positions = torch.randint(0, 4 * T, (B, T), generator=g).float()
    else:
        positions = torch.arange(T).float().expand(B, T)
    freqs = positions[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    if not per_batch:
        cos, sin = cos[:1].expand(B, T, D), sin[:1].expand(B, T, D)
    return cos.to(DEVICE), sin.to(DEVICE)


def random_tables(B, T, D, dtype, seed=0):
    """cos/sin with unrelated halves, so a mix-up of c1/c2 or s1/s2 cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    cos = torch.randn(B, T, D, generator=g).to(dtype).to(DEVICE)
    sin = torch.randn(B, T, D, generator=g).to(dtype).to(DEVICE)
    return cos, sin


def linear_outputs(B, H, K, T, D, dtype, seed=1):
    """(x_q, x_k, dy_q, dy_k): projections' outputs (B, T, H*D), (B, T, K*D) and upstream grads."""
    g = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(B, T, H * D, generator=g),
        torch.randn(B, T, K * D, generator=g),
        torch.randn(B, H, T, D, generator=g),
        torch.randn(B, K, T, D, generator=g),
    ]
    return [t.to(dtype).to(DEVICE) for t in tensors]


def run(fn, x_q, x_k, cos, sin, dy_q, dy_k, D):
    """fn on q, k viewed and transposed from x_q, x_k as the model does; returns
    (q_out, k_out, grad of x_q, grad of x_k)."""
    x_q = x_q.detach().clone().requires_grad_()
    x_k = x_k.detach().clone().requires_grad_()
    B, T = x_q.shape[:2]
    q_BHTD = x_q.view(B, T, -1, D).transpose(1, 2)
    k_BKTD = x_k.view(B, T, -1, D).transpose(1, 2)
    q_out, k_out = fn(q_BHTD, k_BKTD, cos, sin)
    torch.autograd.backward([q_out, k_out], [dy_q, dy_k])
    return q_out.detach(), k_out.detach(), x_q.grad, x_k.grad


@pytest.mark.parametrize(
    "B,H,K,T,D",
    [
        (2, 4, 2, 7, 12),  # grouped-query (K < H), odd T
        (1, 6, 3, 5, 130),  # non-power-of-2 heads and half dim (65)
        (1, 3, 3, 1, 6),  # a single row
        (3, 2, 1, 3, 64),
    ],
)
def test_fp32_matches_twin(B, H, K, T, D):
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, torch.float32)
    for cos, sin in (
        random_tables(B, T, D, torch.float32),
        rotary_tables(B, T, D, torch.float32),
    ):
        ours = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
        twin = run(apply_rope_torch, x_q, x_k, cos, sin, dy_q, dy_k, D)
        assert ours[0].shape == (B, H, T, D) and ours[1].shape == (B, K, T, D)
        for name, value, expected in zip(("q", "k", "d_q", "d_k"), ours, twin):
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, expected, **FP32_TOL, msg=name)


def test_several_head_blocks_per_position(monkeypatch):
    # Real head counts and dims split a position's heads over several programs (tile cap); a
    # small cap does it here: half dim 6 -> block 8, 16 // 8 = 2 heads a program, 3 programs for
    # 5 heads, the last one half masked.
    import fgc_runtime.kernels.triton.rope as rope_module

    monkeypatch.setattr(rope_module, "_MAX_TILE", 16)
    B, H, K, T, D = 2, 5, 3, 3, 12
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, torch.float32)
    cos, sin = random_tables(B, T, D, torch.float32)
    ours = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
    twin = run(apply_rope_torch, x_q, x_k, cos, sin, dy_q, dy_k, D)
    torch.testing.assert_close(ours, twin, **FP32_TOL)


def test_matches_transformers_and_keeps_layout():
    B, H, K, T, D = 2, 4, 1, 5, 16
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, torch.float32)
    cos, sin = rotary_tables(B, T, D, torch.float32, per_batch=True)
    q = x_q.view(B, T, H, D).transpose(1, 2)
    k = x_k.view(B, T, K, D).transpose(1, 2)
    q_out, k_out = apply_rope_triton(q, k, cos, sin)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(q_out, q_ref, **FP32_TOL)
    torch.testing.assert_close(k_out, k_ref, **FP32_TOL)
    # outputs keep the inputs' (transposed) memory layout
    assert q_out.stride() == q.stride() and k_out.stride() == k.stride()


@pytest.mark.parametrize(
    "dtype,shape",
    [(torch.bfloat16, (2, 4, 2, 7, 40)), (torch.float16, (1, 4, 4, 5, 24))],
)
def test_half_precision_rounds_once_and_beats_twin(dtype, shape):
    B, H, K, T, D = shape
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, dtype)
    cos, sin = rotary_tables(B, T, D, dtype, per_batch=True)
    ours = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
    # the exact answer for these (rounded) inputs: computed in fp32
    exact = run(
        apply_rope_torch,
        *(t.float() for t in (x_q, x_k, cos, sin, dy_q, dy_k)),
        D,
    )
    twin = run(
        apply_rope_torch, x_q, x_k, cos, sin, dy_q, dy_k, D
    )  # rounds after each op
    for name, value, exact32, twin_value in zip(
        ("q", "k", "d_q", "d_k"), ours, exact, twin
    ):
        assert value.dtype == dtype
        assert_rounded_once(name, value, exact32, twin_value, dtype)


def test_tables_with_batch_of_one_broadcast():
    B, H, K, T, D = 3, 2, 2, 4, 8
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, torch.float32)
    cos, sin = random_tables(1, T, D, torch.float32)
    ours = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
    twin = run(apply_rope_torch, x_q, x_k, cos, sin, dy_q, dy_k, D)
    torch.testing.assert_close(ours, twin, **FP32_TOL)


def test_non_unit_last_stride_and_expanded_upstream_gradient():
    # q with a last-dim stride of 2 is copied first; out.sum() hands back stride-0 gradients
    B, H, K, T, D = 2, 2, 1, 3, 8
    g = torch.Generator().manual_seed(3)
    q_src = torch.randn(B, H, T, 2 * D, generator=g).to(DEVICE)
    k = torch.randn(B, K, T, D, generator=g).to(DEVICE)
    cos, sin = random_tables(B, T, D, torch.float32)
    results = []
    for fn in (apply_rope_triton, apply_rope_torch):
        q_leaf = q_src.clone().requires_grad_()
        k_leaf = k.clone().requires_grad_()
        q_out, k_out = fn(q_leaf[..., ::2], k_leaf, cos, sin)
        (q_out.sum() + 2 * k_out.sum()).backward()
        results.append((q_out.detach(), k_out.detach(), q_leaf.grad, k_leaf.grad))
    torch.testing.assert_close(results[0], results[1], **FP32_TOL)


def test_gradient_for_q_only():
    B, H, K, T, D = 1, 2, 2, 3, 8
    x_q, x_k, dy_q, _ = linear_outputs(B, H, K, T, D, torch.float32)
    cos, sin = random_tables(B, T, D, torch.float32)
    grads = []
    for fn in (apply_rope_triton, apply_rope_torch):
        q = x_q.view(B, T, H, D).transpose(1, 2).detach().requires_grad_()
        k = x_k.view(B, T, K, D).transpose(1, 2)  # no grad
        q_out, k_out = fn(q, k, cos, sin)
        assert not k_out.requires_grad
        q_out.backward(dy_q)
        grads.append(q.grad)
    torch.testing.assert_close(grads[0], grads[1], **FP32_TOL)


def test_deterministic():
    B, H, K, T, D = 2, 4, 2, 3, 24
    x_q, x_k, dy_q, dy_k = linear_outputs(B, H, K, T, D, torch.bfloat16)
    cos, sin = rotary_tables(B, T, D, torch.bfloat16)
    first = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
    second = run(apply_rope_triton, x_q, x_k, cos, sin, dy_q, dy_k, D)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _args(**changes):
    """Valid (q, k, cos, sin) for B=2, H=4, K=2, T=3, D=8, with some replaced."""
    args = dict(
        q=torch.randn(2, 4, 3, 8),
        k=torch.randn(2, 2, 3, 8),
        cos=torch.randn(2, 3, 8),
        sin=torch.randn(2, 3, 8),
    )
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            dict(cos=torch.randn(2, 3, 8, requires_grad=True)),
            "apply_rope_triton: cos and sin must not require grad",
        ),
        (
            dict(k=torch.randn(2, 2, 5, 8)),
            "apply_rope_triton: k (2, 2, 5, 8) must be (B, K, T, D) with q's B, T and D "
            "(q is (2, 4, 3, 8))",
        ),
        (
            dict(
                q=torch.randn(2, 4, 3, 7),
                k=torch.randn(2, 2, 3, 7),
                cos=torch.randn(2, 3, 7),
            ),
            "apply_rope_triton: the head dim D must be even, got 7",
        ),
        (
            dict(cos=torch.randn(2, 3, 4), sin=torch.randn(2, 3, 4)),
            "apply_rope_triton: cos and sin must be (B, T, D) = (2, 3, 8) (or (1, T, D)), "
            "got (2, 3, 4)",
        ),
        (
            dict(sin=torch.randn(1, 3, 8)),
            "apply_rope_triton: cos (2, 3, 8) and sin (1, 3, 8) must have the same shape",
        ),
        (
            dict(q=torch.randn(4, 3, 8)),
            "apply_rope_triton: q must have 4 dims, got shape (4, 3, 8)",
        ),
        (
            dict(cos=torch.randn(2, 3, 8, dtype=torch.bfloat16)),
            "apply_rope_triton: q, k, cos and sin must have one dtype, got torch.float32, "
            "torch.float32, torch.bfloat16 and torch.float32",
        ),
    ],
)
def test_bad_inputs_raise(changes, message):
    with pytest.raises(ValueError) as excinfo:
        apply_rope_triton(**_args(**changes))
    assert str(excinfo.value).startswith(message)


class TinyAttention(nn.Module):
    """Grouped-query causal attention with a pluggable rotary function, laid out as the model's."""

    def __init__(self, rope_fn, hidden=24, heads=4, kv_heads=2, head_dim=6):
        super().__init__()
        self.rope_fn = rope_fn
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x_BTD, cos_BTE, sin_BTE):
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, -1, self.head_dim).transpose(1, 2)
        q_BHTE, k_BKTE = self.rope_fn(q_BHTE, k_BKTE, cos_BTE, sin_BTE)
        y_BHTE = F.scaled_dot_product_attention(
            q_BHTE, k_BKTE, v_BKTE, is_causal=True, enable_gqa=True
        )
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


def test_training_step_in_module_matches_twin():
    torch.manual_seed(7)
    ours = TinyAttention(apply_rope_triton).to(DEVICE)
    twin = copy.deepcopy(ours)
    twin.rope_fn = apply_rope_torch
    x = torch.randn(2, 5, 24, device=DEVICE)
    target = torch.randn(2, 5, 24, device=DEVICE)
    cos, sin = rotary_tables(2, 5, 6, torch.float32)
    losses = []
    for module in (ours, twin):
        loss = F.mse_loss(module(x, cos, sin), target)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], **FP32_TOL)
    for (name, p), p_twin in zip(ours.named_parameters(), twin.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_twin.grad, **FP32_TOL, msg=name)
