"""fgc_runtime.optim's AdamW and Adafactor: the math against torch.optim's, fp32 state, bf16
stochastic rounding (unbiased, deterministic, resumable), the config knobs (-D optimizer=adafactor,
-D bf16_stochastic_round=true) with their build errors, and a package that trains and resumes
bitwise with each."""

from __future__ import annotations

import copy
import functools
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE, run_fgc
from fgc.build import compile_config
from fgc.codegen.package import PackageBuilder
from fgc.errors import FgcError
from fgc.explain import memory_estimate, model_facts
from fgc.frontend.render import LIBRARY_DIR
from fgc_runtime.optim import (
    Adafactor,
    AdamW,
    describe_groups,
    hashed_rounding_bits,
    param_groups,
    rounding_key,
    stochastic_round_to_bf16,
)

SHAPES = [(7, 13), (13,), (3, 5, 6), ()]  # a matrix, a vector, a 3-D tensor, a scalar


def make_params(dtype=torch.float32, scale=0.1):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * scale).to(dtype)) for s in SHAPES]


def run(params, optimizer, steps, lrs=None, grad_seed=1):
    """STEPS steps with reproducible random gradients (of growing and shrinking size); LRS: the
    learning rate of each step, as a schedule would set it."""
    gen = torch.Generator().manual_seed(grad_seed)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(p.dtype)
        if lrs is not None:
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
        optimizer.step()
    return params


def run_from(params, optimizer, first, steps, grad_seed):
    """Steps FIRST..STEPS of :func:`run` (the same gradients), as a run resumed after step FIRST
    does them."""
    gen = torch.Generator().manual_seed(grad_seed)
    for step in range(steps):
        grads = [(torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(p.dtype) for p in params]
        if step >= first:
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
    return params


def two_groups(params, weight_decay=0.1):
    return [{"params": params[:2], "weight_decay": weight_decay}, {"params": params[2:], "weight_decay": 0.0}]


def roundtrip(state_dict):
    """What a checkpoint does to a state dict: torch.save, then torch.load onto the CPU."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


# -- AdamW against torch.optim.AdamW -----------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, None])
def test_adamw_matches_torch_bitwise_with_fp32_params(foreach):
    lrs = [1e-2 * (0.97**s) for s in range(200)]  # a changing lr, as under a schedule
    ours_p, ref_p = make_params(), make_params()
    ours = AdamW(two_groups(ours_p), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(two_groups(ref_p), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=foreach)
    run(ours_p, ours, 200, lrs)
    run(ref_p, ref, 200, lrs)
    for a, b in zip(ours_p, ref_p):
        assert torch.equal(a, b)  # bitwise: torch's single-tensor ops in torch's order
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ours.state[a][key], ref.state[b][key])
    assert not torch.equal(ours_p[0], make_params()[0])  # it did move


def test_stochastic_rounding_is_a_no_op_for_fp32_params():
    ours_p, ref_p = make_params(), make_params()
    ours = AdamW(ours_p, lr=1e-2, bf16_stochastic_round=True)
    run(ours_p, ours, 20)
    run(ref_p, torch.optim.AdamW(ref_p, lr=1e-2, foreach=False), 20)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))
    assert ours.state_dict()["stochastic_rounding"]["rng"] == {}  # no bits were drawn


def test_bf16_params_keep_fp32_state_and_follow_the_fp32_run():
    params = make_params(torch.bfloat16)
    opt = AdamW(params, lr=1e-3, weight_decay=0.1)
    run(params, opt, 30)
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
    # torch's AdamW on fp32 copies, with the weights rounded to bf16 after each step, is the same
    # run: the update in fp32 from fp32 state, the weights rounded to nearest
    ref = [torch.nn.Parameter(p.float()) for p in make_params(torch.bfloat16)]
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(1)
    for step in range(30):
        for p in ref:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(torch.bfloat16).float()
        ref_opt.step()
        with torch.no_grad():
            for p in ref:
                p.copy_(p.to(torch.bfloat16))
    for p, r in zip(params, ref):
        assert torch.equal(p.float(), r)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"])


# -- Adafactor against torch.optim.Adafactor ---------------------------------------------------------

# torch.optim.Adafactor always uses a relative step, min(lr, 1/sqrt(t)) x max(eps2, RMS(param)).
# Ours with relative_step and scale_parameter is that; ours with an explicit lr (the default) is
# torch's with eps2 = 1 (the weights' RMS stays below 1) and lr below 1/sqrt(t).
ADAFACTOR_CASES = {
    "relative step": (dict(lr=1e-2, relative_step=True, scale_parameter=True), dict(lr=1e-2, eps=(1e-30, 1e-3))),
    "explicit lr": (dict(lr=1e-3), dict(lr=1e-3, eps=(1e-30, 1.0))),
}


@pytest.mark.parametrize("case", sorted(ADAFACTOR_CASES))
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adafactor_matches_torch_adafactor(case, weight_decay):
    ours_kw, torch_kw = ADAFACTOR_CASES[case]
    ours_p, ref_p = make_params(), make_params()
    ours = Adafactor(ours_p, weight_decay=weight_decay, **ours_kw)
    ref = torch.optim.Adafactor(ref_p, weight_decay=weight_decay, **torch_kw)
    run(ours_p, ours, 100)
    run(ref_p, ref, 100)
    # not bitwise: eps1 is added at another place and a few operations are ordered differently;
    # after 100 steps the weights agree to about 3e-8 (they moved by about 2e-2)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ("row_var", "col_var", "variance"):
            assert (key in ours.state[a]) == (key in ref.state[b])
            if key in ref.state[b]:
                torch.testing.assert_close(ours.state[a][key], ref.state[b][key], rtol=1e-5, atol=1e-12)
    moved = max((a - b).abs().max().item() for a, b in zip(ours_p, make_params()))
    assert moved > 1e-2
    assert ours.state[ours_p[0]]["row_var"].shape == (7, 1) and ours.state[ours_p[0]]["col_var"].shape == (1, 13)
    assert ours.state[ours_p[2]]["row_var"].shape == (3, 5, 1) and ours.state[ours_p[2]]["col_var"].shape == (3, 1, 6)


def reference_adafactor(weights, grads, lr, beta1, beta2_decay=-0.8, eps=(1e-30, 1e-3), clip=1.0, wd=0.0):
    """The paper's Algorithm 4 (factored, with update clipping and a first moment), written out
    in float64 for one matrix: R_t, C_t, V = R C / sum(R), U = G / sqrt(V), clip, m."""
    x = weights.double().clone()
    r = c = m = None
    for t, g in enumerate(grads, 1):
        g = g.double()
        b2 = 1 - t**beta2_decay
        sq = g * g + eps[0]
        r = (1 - b2) * sq.mean(1) if r is None else b2 * r + (1 - b2) * sq.mean(1)
        c = (1 - b2) * sq.mean(0) if c is None else b2 * c + (1 - b2) * sq.mean(0)
        v = torch.outer(r, c) / r.mean()
        u = g / v.sqrt()
        u = u / max(1.0, (u.square().mean().sqrt() / clip).item())
        m = (1 - beta1) * u if m is None else beta1 * m + (1 - beta1) * u
        x = x * (1 - lr * wd) - lr * m
    return x


def test_adafactor_with_a_first_moment_follows_the_paper():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 9, generator=gen) * 0.1
    grads = [torch.randn(6, 9, generator=gen) * (0.01 if t % 2 else 10.0) for t in range(40)]
    p = torch.nn.Parameter(w0.clone())
    opt = Adafactor([p], lr=1e-2, beta1=0.9, clip_threshold=1.0, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(
        p.detach().double(), reference_adafactor(w0, grads, 1e-2, 0.9, wd=0.1), rtol=1e-5, atol=1e-7
    )
    assert opt.state[p]["exp_avg"].shape == (6, 9)


def test_adafactor_zero_gradients_leave_the_weights_finite_and_unchanged():
    p = torch.nn.Parameter(torch.randn(4, 5))
    v = torch.nn.Parameter(torch.randn(5))
    before = (p.detach().clone(), v.detach().clone())
    opt = Adafactor([p, v], lr=1e-2)
    for _ in range(3):
        p.grad, v.grad = torch.zeros_like(p), torch.zeros_like(v)
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(v, before[1])


def test_bad_arguments_are_value_errors():
    params = make_params()
    with pytest.raises(ValueError, match="invalid betas"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="invalid beta2_decay"):
        Adafactor(params, beta2_decay=0.5)
    with pytest.raises(ValueError, match="invalid eps"):
        Adafactor(params, eps=(0.0, 1e-3))
    with pytest.raises(ValueError, match="invalid clip_threshold"):
        Adafactor(params, clip_threshold=0.5)


# -- stochastic rounding ------------------------------------------------------------------------------


def bf16_neighbours(x: float) -> tuple[float, float]:
    """The bf16 values just below and above X (in magnitude order of the bit patterns)."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32) & -65536
    lo = bits.view(torch.float32).item()
    hi = (bits + 65536).view(torch.float32).item()
    return lo, hi


def test_the_fused_step_follows_a_state_loaded_into_the_same_optimizer():
    """The fused step keeps flat views of each parameter's state from one step to the next: a
    state dict loaded into the optimizer that made them replaces that state, and the next steps
    start from the loaded one."""
    params = mixed_params()
    opt = AdamW(two_groups(params), lr=1e-2, bf16_stochastic_round=True, seed=7, fused=True)
    run(params, opt, 2, grad_seed=3)
    saved_weights, saved = [p.detach().clone() for p in params], roundtrip(opt.state_dict())
    after = [p.detach().clone() for p in run_from(params, opt, 2, 4, grad_seed=3)]
    with torch.no_grad():
        for p, w in zip(params, saved_weights):
            p.copy_(w)
    opt.load_state_dict(saved)  # the same optimizer, its views made in steps 3 and 4
    assert all(opt.state[p]["step"] == 2 for p in params)
    for a, b in zip(run_from(params, opt, 2, 4, grad_seed=3), after):
        assert torch.equal(a, b)


def test_the_fused_step_follows_a_parameter_whose_data_is_replaced():
    """``param.data = ...`` between steps (as some wrappers do): the fused step writes the new
    data, as the unfused one does."""
    results = []
    for fused in (False, True):
        params = make_params(torch.float32)
        opt = AdamW(params, lr=1e-2, fused=fused)
        run(params, opt, 2)
        for p in params:
            p.data = p.data.clone()
        run(params, opt, 2, grad_seed=2)
        assert all(opt.state[p]["step"] == 4 for p in params)
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("x", [1.0 + 0.3 * 2**-7, -(1.0 + 0.3 * 2**-7), 3.14159, -2.5e-3, 1e-30, 7.1e4 + 0.9 * 2**9])
def test_stochastic_rounding_is_unbiased(x):
    n = 200_000
    lo, hi = bf16_neighbours(x)
    assert lo != x != hi
    rounded = stochastic_round_to_bf16(torch.full((n,), x), torch.Generator().manual_seed(0)).double()
    assert set(rounded.unique().tolist()) == {lo, hi}  # only the two neighbours
    p = (x - lo) / (hi - lo)  # the probability of rounding to hi
    standard_error = abs(hi - lo) * (p * (1 - p) / n) ** 0.5
    assert abs(rounded.mean().item() - x) < 4 * standard_error
    # round to nearest is biased for the same input: every value goes to one neighbour
    nearest = torch.full((n,), x).to(torch.bfloat16).double()
    assert abs(nearest.mean().item() - x) > 100 * standard_error


def test_stochastic_rounding_edge_values():
    special = torch.tensor(
        [float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1.0, -2.0, 2**-133, torch.finfo(torch.float32).max]
    )
    for seed in range(5):
        out = stochastic_round_to_bf16(special.repeat(1000), torch.Generator().manual_seed(seed)).view(1000, -1)
        assert torch.isposinf(out[:, 0]).all() and torch.isneginf(out[:, 1]).all() and torch.isnan(out[:, 2]).all()
        assert (out[:, 3] == 0).all() and not torch.signbit(out[:, 3]).any()
        assert (out[:, 4] == 0).all() and torch.signbit(out[:, 4]).all()  # -0.0 stays negative
        assert (out[:, 5] == 1.0).all() and (out[:, 6] == -2.0).all()  # exact bf16 values are kept
        assert (out[:, 7].float() == 2**-133).all()  # a bf16 subnormal
        # above bf16's largest value: the largest value or, carried into the exponent, inf
        top = out[:, 8].float()
        assert ((top == torch.finfo(torch.bfloat16).max) | torch.isposinf(top)).all()


def test_stochastic_rounding_is_deterministic_in_its_generator():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    a = stochastic_round_to_bf16(x, torch.Generator().manual_seed(7))
    b = stochastic_round_to_bf16(x, torch.Generator().manual_seed(7))
    c = stochastic_round_to_bf16(x, torch.Generator().manual_seed(8))
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert not torch.equal(a.view(torch.int16), c.view(torch.int16))


@pytest.mark.parametrize("optimizer_cls", [AdamW, Adafactor, functools.partial(AdamW, fused=True)])
def test_updates_below_bf16_resolution_move_the_weights_only_with_stochastic_rounding(optimizer_cls):
    # the step of each parameter is lr = 1e-4 (AdamW's normalised step for a constant gradient;
    # Adafactor's clipped update of RMS 1), 1/78 of bf16's spacing at 1.0 (2**-7)
    results = {}
    for rounding in (False, True):
        p = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = optimizer_cls([p], lr=1e-4, weight_decay=0.0, bf16_stochastic_round=rounding, seed=0)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        results[rounding] = p.float()
    assert (results[False] == 1.0).all()  # round to nearest: every update is lost
    moved = 1.0 - results[True].mean().item()
    assert moved == pytest.approx(100 * 1e-4, rel=0.05)  # stochastic rounding: they add up


# -- the fused AdamW step (one compiled function) ---------------------------------------------------


def test_the_fused_step_follows_the_unfused_one():
    """fused=True: the same math compiled, to fp32 rounding; bf16 weights rounded to nearest as
    the unfused step rounds them, or stochastically within one bf16 step of the fp32 result."""
    def fused_and_not(dtype, rounding):
        out = []
        for fused in (False, True):
            params = make_params(dtype)
            opt = AdamW(two_groups(params), lr=1e-2, betas=(0.9, 0.95), bf16_stochastic_round=rounding, seed=3,
                        fused=fused)
            run(params, opt, 5, lrs=[1e-2, 8e-3, 6e-3, 4e-3, 2e-3])
            out.append((params, opt))
        return out

    (ref, ref_opt), (fused, fused_opt) = fused_and_not(torch.float32, False)
    for a, b in zip(ref, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fused_opt.state[b][key], ref_opt.state[a][key], rtol=1e-5, atol=1e-8)
        assert fused_opt.state[b]["step"] == ref_opt.state[a]["step"] == 5
    (ref, _), (fused, _) = fused_and_not(torch.bfloat16, False)
    for a, b in zip(ref, fused):
        assert b.dtype == torch.bfloat16
        # the same fp32 values rounded alike, but for the rare value an fp32 rounding apart
        assert (a != b).float().mean() < 0.02
        torch.testing.assert_close(b.float(), a.float(), rtol=2**-7, atol=1e-6)
    # stochastically, in a mixed model: each bf16 weight within one bf16 step of the fp32 run's
    # (one step: AdamW's first update is about lr times the gradient's sign, whatever its rounding)
    fp32 = make_params(torch.float32)
    for p in fp32:  # the bf16 starting values, in fp32
        p.data = p.data.to(torch.bfloat16).float()
    run(fp32, AdamW(two_groups(fp32), lr=1e-2, betas=(0.9, 0.95), seed=3), 1)
    mixed = mixed_params()
    run(mixed, AdamW(two_groups(mixed), lr=1e-2, betas=(0.9, 0.95), bf16_stochastic_round=True, seed=3,
                     fused=True), 1)
    assert [p.dtype for p in mixed] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    for a, b in zip(fp32, mixed):
        if b.dtype == torch.bfloat16:
            assert ((b.float() - a).abs() <= a.abs() * 2**-7 + 1e-30).all()
    # rounded both ways: not the nearest value every time
    nearest = [a.to(torch.bfloat16) for a in fp32]
    assert any(not torch.equal(n, b) for n, b in zip(nearest, mixed) if b.dtype == torch.bfloat16)


def test_the_fused_step_follows_the_unfused_one_when_parameters_have_taken_different_steps():
    """A parameter without a gradient is not stepped: the parameters' step counts then differ,
    and each one's bias corrections follow its own count."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((4, 3), (5,), (2,))]
        opt = AdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-2, fused=fused)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for i, p in enumerate(params):
                # the second parameter (in the first's group) has no gradient in the first two steps
                p.grad = torch.randn(p.shape, generator=g) if i != 1 or step >= 2 else None
            opt.step()
        assert [opt.state[p]["step"].item() for p in params] == [4, 2, 4]
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_the_fused_step_works_on_parameters_that_are_not_contiguous():
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        param = torch.nn.Parameter(weights.t().contiguous().t())  # transposed strides
        assert not param.is_contiguous()
        opt = AdamW([param], lr=1e-2, fused=fused)
        run([param], opt, 3)
        assert not param.is_contiguous() and not opt.state[param]["exp_avg"].is_contiguous()
        results.append(param.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("x", [1.0 + 0.3 * 2**-7, -(1.0 + 0.3 * 2**-7), 3.14159, -2.5e-3, 7.1e4 + 0.9 * 2**9])
def test_hashed_rounding_is_unbiased_over_elements_and_over_steps(x):
    from fgc_runtime.optim import _round_to_bf16

    n = 200_000
    lo, hi = bf16_neighbours(x)
    p = (x - lo) / (hi - lo)
    standard_error = abs(hi - lo) * (p * (1 - p) / n) ** 0.5
    # one step: the elements of a tensor
    bits = hashed_rounding_bits(torch.Size([n]), torch.tensor(rounding_key(1234, 7, 3)))
    assert bits.dtype == torch.int32 and 0 <= bits.min() and bits.max() < 65536
    rounded = _round_to_bf16(torch.full((n,), x), bits).double()
    assert set(rounded.unique().tolist()) == {lo, hi}
    assert abs(rounded.mean().item() - x) < 4 * standard_error
    # one element over many steps (keys)
    keys = [rounding_key(1234, step, 3) for step in range(1, 20_001)]
    assert len(set(keys)) == len(keys)
    over_steps = torch.stack([_round_to_bf16(torch.tensor([x]), hashed_rounding_bits(torch.Size([1]), torch.tensor(k)))
                              for k in keys]).double()
    assert abs(over_steps.mean().item() - x) < 4 * standard_error * (n / len(keys)) ** 0.5


def test_the_fused_step_refuses_a_tensor_too_large_for_its_hash():
    # the element index times the hash's multiplier must fit int64: fewer than 2**31 elements
    param = torch.nn.Parameter(torch.empty(2**31, dtype=torch.bfloat16, device="meta"))
    param.grad = torch.empty_like(param)
    small = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16, device="meta"))
    small.grad = torch.ones_like(small)
    opt = AdamW([small, param], lr=1e-3, bf16_stochastic_round=True, fused=True)
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 elements stochastically, not one of 2147483648"):
        opt.step()
    # refused before any step was counted
    assert opt.state[small]["step"] == 0 and not opt.state[param]


def test_hashed_bits_are_the_same_compiled():
    key = torch.tensor(rounding_key(99, 1, 0))
    compiled = torch.compile(hashed_rounding_bits, fullgraph=True, dynamic=False)
    assert torch.equal(compiled(torch.Size([33, 65]), key), hashed_rounding_bits(torch.Size([33, 65]), key))


# -- state dicts: fp32 state and the generators survive save, load and resume -----------------------


def sr_optimizer(cls, params, **kw):
    groups = two_groups(params)
    if cls is AdamW:
        return AdamW(groups, lr=1e-2, betas=(0.9, 0.95), bf16_stochastic_round=True, seed=1234, **kw)
    return Adafactor(groups, lr=1e-2, beta1=0.9, weight_decay=0.1, bf16_stochastic_round=True, seed=1234, **kw)


def mixed_params():
    """bf16 weights with an fp32 one among them (a mixed model)."""
    params = make_params(torch.bfloat16)
    params[1] = torch.nn.Parameter(params[1].detach().float())
    return params


@pytest.mark.parametrize("cls", [AdamW, Adafactor])
def test_a_resume_from_the_state_dict_is_bitwise_exact(cls):
    # the uninterrupted run
    full_p = mixed_params()
    full = sr_optimizer(cls, full_p)
    run(full_p, full, 10, grad_seed=5)
    # 4 steps, a checkpoint, a fresh optimizer on the saved weights, 6 more steps
    part_p = mixed_params()
    part = sr_optimizer(cls, part_p)
    run(part_p, part, 4, grad_seed=5)
    saved_weights = [p.detach().clone() for p in part_p]
    saved = roundtrip(part.state_dict())
    assert saved["stochastic_rounding"]["rng"].keys() == {"cpu"}

    def resumed(state_dict):
        params = [torch.nn.Parameter(w.clone()) for w in saved_weights]
        opt = sr_optimizer(cls, params)
        opt.load_state_dict(state_dict)
        for p in params:  # torch casts loaded state to the parameter's dtype; ours stays fp32
            assert all(v.dtype == torch.float32 for k, v in opt.state[p].items() if k != "step")
        # the remaining 6 steps see the gradients the full run saw at steps 5..10
        return run_from(params, opt, 4, 10, grad_seed=5)

    for a, b in zip(resumed(copy.deepcopy(saved)), full_p):
        assert torch.equal(a, b)
    # the generator state is what makes it exact: without it (re-seeded), the weights differ
    without = copy.deepcopy(saved)
    del without["stochastic_rounding"]
    assert not all(torch.equal(a, b) for a, b in zip(resumed(without), full_p))


def test_a_fused_resume_from_the_state_dict_is_bitwise_exact():
    """The fused step's rounding bits come from the seed, each parameter's step and its place:
    all in the state dict, so a resumed run rounds as the uninterrupted one."""
    def fused(params, seed=1234):
        return AdamW(two_groups(params), lr=1e-2, betas=(0.9, 0.95), bf16_stochastic_round=True, seed=seed,
                     fused=True)

    full_p = mixed_params()
    run(full_p, fused(full_p), 6, grad_seed=5)
    part_p = mixed_params()
    part = fused(part_p)
    run(part_p, part, 3, grad_seed=5)
    saved_weights, saved = [p.detach().clone() for p in part_p], roundtrip(part.state_dict())

    def resumed(seed):
        params = [torch.nn.Parameter(w.clone()) for w in saved_weights]
        opt = fused(params, seed=seed)
        opt.load_state_dict(copy.deepcopy(saved))
        return run_from(params, opt, 3, 6, grad_seed=5)

    # the seed given to the fresh optimizer is replaced by the saved one
    for a, b in zip(resumed(seed=1), full_p):
        assert torch.equal(a, b)
    # and the seed matters: another one rounds otherwise
    saved["stochastic_rounding"]["seed"] = 1
    assert not all(torch.equal(a, b) for a, b in zip(resumed(seed=1), full_p))


def test_loaded_state_keeps_its_fp32_values_and_the_group_mapping():
    params = mixed_params()
    opt = sr_optimizer(AdamW, params)
    run(params, opt, 3)
    state = roundtrip(opt.state_dict())
    fresh = mixed_params()
    other = sr_optimizer(AdamW, fresh)
    other.load_state_dict(state)
    for p, q in zip(params, fresh):
        for key in ("exp_avg", "exp_avg_sq"):
            assert other.state[q][key].dtype == torch.float32
            assert torch.equal(other.state[q][key], opt.state[p][key])  # not rounded through bf16
    # loaded before its first step, the optimizer hands the saved generator state on unchanged
    again = other.state_dict()["stochastic_rounding"]
    assert torch.equal(again["rng"]["cpu"], state["stochastic_rounding"]["rng"]["cpu"])
    assert again["seed"] == 1234


def test_the_optimizer_step_in_the_backward_rounds_and_resumes_exactly():
    # OptimizerInBackward makes one inner optimizer per parameter: each saves its own generator
    from functools import partial

    from fgc_runtime.optim_in_backward import OptimizerInBackward

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)).to(torch.bfloat16)
        factory = partial(AdamW, lr=1e-2, bf16_stochastic_round=True)
        return model, OptimizerInBackward(param_groups(model, ["bias"]), factory)

    def steps(model, first, last):
        gen = torch.Generator().manual_seed(9)
        for step in range(last):
            x = torch.randn(4, 8, generator=gen).to(torch.bfloat16)
            if step >= first:
                model(x).float().square().mean().backward()  # the steps happen in here

    full, _ = model_and_optimizer()
    steps(full, 0, 6)
    assert not torch.equal(full[0].weight, model_and_optimizer()[0][0].weight)
    part, opt = model_and_optimizer()
    steps(part, 0, 3)
    saved_model, saved_opt = roundtrip(part.state_dict()), roundtrip(opt.state_dict())
    assert all("stochastic_rounding" in inner for inner in saved_opt["inner"])
    resumed, opt = model_and_optimizer()
    resumed.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    steps(resumed, 3, 6)
    for a, b in zip(resumed.parameters(), full.parameters()):
        assert torch.equal(a, b)


def test_the_default_seed_is_the_runs_seed():
    torch.manual_seed(42)
    assert AdamW(make_params(), lr=1e-3).state_dict()["stochastic_rounding"]["seed"] == 42


def test_describe_groups_sees_the_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = Adafactor(param_groups(model, ["bias", r"^1\."]), lr=1e-3, weight_decay=0.1)
    lines = describe_groups(model, opt).splitlines()
    assert lines[0] == "0.weight  (4, 4)  group=decay  lr=0.001  weight_decay=0.1"
    assert lines[1] == "0.bias  (4,)  group=no_decay  lr=0.001  weight_decay=0.0"


# -- the config ---------------------------------------------------------------------------------------

LIB_TRAIN = LIBRARY_DIR / "lm" / "train.yaml"


def library_line(prefix: str) -> int:
    """The line of lm/train.yaml that starts with PREFIX."""
    (n,) = [i for i, line in enumerate(LIB_TRAIN.read_text().splitlines(), 1) if line.startswith(prefix)]
    return n


def train_py(**variables) -> str:
    compiled = compile_config(EXAMPLE, variables=variables)
    return PackageBuilder(compiled.program).build().files["train.py"].decode()


def errors(**variables) -> list:
    with pytest.raises(FgcError) as info:
        compile_config(EXAMPLE, variables=variables)
    return info.value.diagnostics


def test_the_knobs_pick_the_optimizers():
    assert "torch.optim.AdamW, lr=0.003, betas=(0.9, 0.95), weight_decay=0.1" in train_py(precision="bf16")
    source = train_py(precision="bf16", bf16_stochastic_round=True)
    assert (
        "fgc_runtime.optim.AdamW,\n    lr=0.003,\n    betas=(0.9, 0.95),\n    weight_decay=0.1,\n"
        "    bf16_stochastic_round=True,\n)" in source
    )
    assert "fgc_runtime.optim.Adafactor, lr=0.003, weight_decay=0.1\n" in train_py(optimizer="adafactor")
    assert "fgc_runtime.optim.Adafactor, lr=0.003, beta1=0.9, weight_decay=0.1\n" in train_py(
        optimizer="adafactor", momentum=0.9
    )
    assert "bf16_stochastic_round=True" in train_py(optimizer="adafactor", precision="bf16", bf16_stochastic_round=True)


@pytest.mark.parametrize("optimizer", ["sgd", "muon"])
def test_stochastic_rounding_with_sgd_or_muon_is_an_error_at_its_line(optimizer):
    proc = run_fgc(
        "check", EXAMPLE, "-D", f"optimizer={optimizer}", "-D", "precision=bf16", "-D", "bf16_stochastic_round=true"
    )
    assert proc.returncode == 2
    line = library_line('-- set _ = raise("bf16_stochastic_round')
    assert proc.stderr.splitlines()[0] == (
        f"fgc/templates/lm/train.yaml:{line}: error: bf16_stochastic_round applies to the adamw and "
        f"adafactor optimizers, not {optimizer}"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_stochastic_rounding_without_bf16_weights_is_an_error(precision, optimizer):
    (err,) = errors(optimizer=optimizer, precision=precision, bf16_stochastic_round=True)
    assert (Path(err.loc.file).name, err.loc.line) == ("train.yaml", library_line("    bf16_stochastic_round:"))
    assert err.message == (
        f"bf16_stochastic_round rounds bf16 weights, but precision {precision} keeps the weights in fp32: "
        "it would do nothing"
    )
    assert "use precision bf16" in err.hint and "-D bf16_stochastic_round=True" in err.hint


@pytest.mark.parametrize(
    "variables,message",
    [
        (dict(optimizer="adafactor", trainer_type="fsdp2"), "fgc_runtime.optim.Adafactor needs whole weight matrices"),
        (
            dict(bf16_stochastic_round=True, precision="bf16", trainer_type="pipeline"),
            "fgc_runtime.optim.AdamW needs its own state dict in checkpoints (it holds the stochastic-rounding generators)",
        ),
    ],
)
def test_the_runtime_optimizers_need_the_basic_or_ddp_trainer(variables, message):
    (err,) = errors(**variables)
    assert message in err.message
    assert f"it works with the basic and ddp trainers, not {variables['trainer_type']}" in err.message


@pytest.mark.parametrize(
    "variables,message,line",
    [
        (
            dict(optimizer="adafactor"),
            "fgc_runtime.optim.Adafactor needs whole weight matrices (its second moments are factored over rows "
            "and columns)",
            "optimizer: !partial:",
        ),
        (
            dict(bf16_stochastic_round=True, precision="bf16"),
            "fgc_runtime.optim.AdamW rounds plain tensors stochastically",
            "    bf16_stochastic_round:",
        ),
    ],
)
def test_the_runtime_optimizers_refuse_tensor_parallel_weights(variables, message, line):
    """ddp with tensor_degree 2 makes the weights DTensors: both optimizers failed at the first
    step there (Adafactor's factored moments, AdamW's rounding bits); now a build error."""
    (err,) = errors(trainer_type="ddp", tensor_degree=2, **variables)
    assert err.message == (
        f"{message}, but tensor_degree 2 shards the weights across ranks (DTensors): it works with tensor_degree 1"
    )
    assert (Path(err.loc.file).name, err.loc.line) == ("train.yaml", library_line(line))
    # without tensor parallelism the same config builds
    compile_config(EXAMPLE, variables=dict(trainer_type="ddp", **variables))


def test_explain_counts_fp32_and_factored_state():
    def optimizer_bytes(**variables):
        compiled = compile_config(EXAMPLE, variables=variables)
        facts = model_facts(compiled)
        return memory_estimate(compiled, facts)["optimizer state"], facts

    torch_bf16, facts = optimizer_bytes(precision="bf16")
    assert torch_bf16 == 2 * facts.total * 2  # torch's AdamW keeps bf16 state for bf16 weights
    assert optimizer_bytes(precision="bf16", bf16_stochastic_round=True)[0] == 2 * facts.total * 4
    factored, _ = optimizer_bytes(optimizer="adafactor")
    # tiny_llama: embedding and head (257 x 96), 3 layers of q, k, v, o, gate, up, down and two
    # norms, and the final norm
    layer = (96 + 96) + 2 * (48 + 96) + (96 + 96) + (256 + 96) * 2 + (96 + 256) + 2 * 96
    assert factored == (2 * (257 + 96) + 3 * layer + 96) * 4
    assert optimizer_bytes(optimizer="adafactor", momentum=0.9)[0] == factored + facts.total * 4


# -- a package that trains and resumes -----------------------------------------------------------------


def _train(out: Path, run_dir: Path, *flags) -> list[float]:
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(run_dir), "--log-every", "1", *map(str, flags)],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the CPU kernel did not build" not in proc.stderr  # the fused step ran its C kernel
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


SMALL = [
    "-D",
    "trainer_type=basic",
    "-D",
    "max_steps=4",
    "-D",
    "eval_every=0",
    "-D",
    "num_hidden_layers=2",
    "-D",
    "seq_len=64",
    "-D",
    "batch_size=4",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,flags,marker",
    [
        ("adamw-sr", ["-D", "precision=bf16", "-D", "bf16_stochastic_round=true"], "fgc_runtime.optim.AdamW"),
        (
            "adamw-sr-fused",
            ["-D", "precision=bf16", "-D", "bf16_stochastic_round=true", "-D", "fused_optimizer=true"],
            "    bf16_stochastic_round=True,\n    fused=True,\n",
        ),
        ("adafactor", ["-D", "optimizer=adafactor"], "fgc_runtime.optim.Adafactor"),
    ],
)
def test_the_package_trains_and_resumes_bitwise(tmp_path, name, flags, marker):
    out = tmp_path / name
    run_fgc("build", EXAMPLE, "-o", out, *SMALL, *flags, check=True)
    assert marker in (out / "train.py").read_text()
    full = _train(out, tmp_path / "full", "--save-every", "2")
    assert len(full) == 4 and full[-1] < full[0]
    # a second run resumes from the full run's checkpoint of step 2 and does steps 3 and 4
    resumed = _train(out, tmp_path / "part", "--resume", tmp_path / "full" / "checkpoints" / "step-00000002")
    assert resumed == full[2:]
    last = "checkpoints/step-00000004"
    weights = [torch.load(tmp_path / run / last / "model.pt", weights_only=True) for run in ("full", "part")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    state = torch.load(tmp_path / "full" / last / "optimizer.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for s in state["state"].values() for v in s.values())
    if name.startswith("adamw-sr"):
        assert all(w.dtype == torch.bfloat16 for w in weights[0].values())
        # the fused step's bits come from a hash of the seed and the step, not from a generator
        assert state["stochastic_rounding"]["rng"].keys() == (set() if "fused" in name else {"cpu"})


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True])
def test_ddp_replicas_stay_bitwise_equal_with_stochastic_rounding(tmp_path, fused):
    """Every rank seeds its rounding generator alike (the run's seed), or with the fused step
    hashes the same keys, so the bf16 replicas of a DDP job round their equal updates alike and
    never drift apart."""
    out = tmp_path / "ddp"
    flags = [f if f != "trainer_type=basic" else "trainer_type=ddp" for f in SMALL]
    run_fgc("build", EXAMPLE, "-o", out, *flags, "-D", "precision=bf16", "-D", "bf16_stochastic_round=true",
            "-D", f"fused_optimizer={str(fused).lower()}", check=True)
    assert ("fused=True" in (out / "train.py").read_text()) == fused
    # every rank's model state as it saves its last checkpoint (only rank 0 writes model.pt)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import os, runpy, sys, torch\n"
        "build, dump = sys.argv[1], sys.argv[2]\n"
        "sys.path.insert(0, build)\n"
        "import fgc_runtime.checkpoint as ck\n"
        "original = ck.save_checkpoint\n"
        "def save_checkpoint(output_dir, **kwargs):\n"
        "    name = f\"rank{os.environ['RANK']}-step{kwargs['step']}.pt\"\n"
        "    torch.save(kwargs['model_state'], os.path.join(dump, name))\n"
        "    return original(output_dir, **kwargs)\n"
        "ck.save_checkpoint = save_checkpoint\n"
        "sys.argv = [os.path.join(build, 'train.py')] + sys.argv[3:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    dump = tmp_path / "dump"
    dump.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(wrapper), str(out), str(dump),
         "--output-dir", str(tmp_path / "run"), "--log-every", "1", "--save-every", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        states = [torch.load(dump / f"rank{r}-step{step}.pt", weights_only=True) for r in (0, 1)]
        assert all(v.dtype == torch.bfloat16 for v in states[0].values())
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), f"step {step}"
    # the weights moved between the two saves, and model.pt is what rank 0 held
    early = torch.load(dump / "rank0-step2.pt", weights_only=True)
    assert not torch.equal(early["lm_head.weight"], states[0]["lm_head.weight"])
    saved = torch.load(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], states[0][k]) for k in saved)
