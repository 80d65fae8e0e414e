"""Learning-rate schedules: values at the phase boundaries, token budgets, argument errors."""

import math

import pytest
import torch

from fgc_runtime.train import (
    ScheduleError,
    constant,
    infinite_lr,
    warmup_cosine,
    warmup_stable_decay,
)


def lrs(scheduler_fn, steps, base=2.0, **kw):
    """The lr of steps 0 .. steps-1 (read before each optimizer step, as the trainer does)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = scheduler_fn(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_cosine():
    values = lrs(warmup_cosine, 16, warmup=4, total=12, min_lr_ratio=0.1)
    assert values[0] == pytest.approx(2.0 * 1 / 5)
    assert values[3] == pytest.approx(2.0 * 4 / 5)
    assert values[4] == pytest.approx(2.0)
    # halfway through the decay: cos(pi/2) = 0 -> 0.1 + 0.9 * 0.5
    assert values[8] == pytest.approx(2.0 * 0.55)
    assert values[12] == pytest.approx(0.2)
    assert values[15] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_warmup_longer_than_the_run_never_decays():
    values = lrs(warmup_cosine, 6, warmup=30, total=6)
    assert values == pytest.approx([2.0 * (s + 1) / 31 for s in range(6)])


def test_constant_schedule():
    assert lrs(constant, 4, warmup=0) == [2.0] * 4
    assert lrs(constant, 4, warmup=1) == pytest.approx([1.0, 2.0, 2.0, 2.0])


def test_warmup_stable_decay_linear_and_1_sqrt():
    # warmup 2, stable until 10 - 0.4 * 10 = 6, decay over [6, 10) to 0.1
    linear = lrs(warmup_stable_decay, 12, base=1.0, warmup=2, total=10, decay_fraction=0.4,
                 decay_shape="linear", min_lr_ratio=0.1)
    assert linear[:2] == pytest.approx([1 / 3, 2 / 3])
    assert linear[2:7] == [1.0] * 5  # stable, and the decay's first step is still 1
    assert linear[7:10] == pytest.approx([0.1 + 0.9 * (1 - q) for q in (0.25, 0.5, 0.75)])
    assert linear[10:] == pytest.approx([0.1, 0.1])
    sqrt = lrs(warmup_stable_decay, 11, base=1.0, warmup=2, total=10, decay_fraction=0.4,
               decay_shape="1-sqrt", min_lr_ratio=0.0)
    assert sqrt[6:] == pytest.approx([1.0, 1 - math.sqrt(0.25), 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 0.0])


def test_warmup_stable_decay_starts_decay_after_the_warmup_at_the_latest():
    values = lrs(warmup_stable_decay, 8, base=1.0, warmup=4, total=8, decay_fraction=1.0,
                 decay_shape="linear", min_lr_ratio=0.0)
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 0.75, 0.5, 0.25])


def test_infinite_lr_phases():
    # warmup 2, cooldown 4 to 0.25, constant, annealing over the last 4 of 14 down to 0.05
    values = lrs(infinite_lr, 16, base=1.0, warmup=2, cooldown=4, constant_ratio=0.25,
                 anneal=4, total=14, min_lr_ratio=0.05)
    assert values[:2] == pytest.approx([1 / 3, 2 / 3])
    assert values[2] == pytest.approx(1.0)  # the cooldown starts at the peak
    # inverse square root, normalised: c + (1 - c) * (1/sqrt(1 + 8q) - 1/3) / (2/3)
    q = 0.5
    assert values[4] == pytest.approx(0.25 + 0.75 * (1 / math.sqrt(1 + 8 * q) - 1 / 3) * 1.5)
    assert all(a > b for a, b in zip(values[2:6], values[3:7]))
    assert values[6:11] == pytest.approx([0.25] * 5)  # constant until the annealing at 14 - 4
    assert values[12] == pytest.approx(0.25 * (0.05 / 0.25) ** 0.5)  # exponential
    assert values[14:] == pytest.approx([0.05, 0.05])


def test_infinite_lr_without_annealing_stays_constant():
    values = lrs(infinite_lr, 50, base=1.0, warmup=0, cooldown=10, constant_ratio=0.5)
    assert values[0] == 1.0
    assert values[10:] == [0.5] * 40


@pytest.mark.parametrize(
    "fn, kw",
    [
        (warmup_cosine, {"warmup": 3, "total": 10}),
        (constant, {"warmup": 3}),
        (warmup_stable_decay, {"warmup": 3, "total": 10, "decay_fraction": 0.3}),
        (infinite_lr, {"warmup": 3, "cooldown": 2, "anneal": 2, "total": 10, "min_lr_ratio": 0.1}),
    ],
)
def test_token_budgets_equal_step_budgets_scaled(fn, kw):
    """A budget of B steps and one of B * tokens_per_step tokens give the same schedule."""
    tokens_per_step = 16 * 128
    in_tokens = {k: v * tokens_per_step if k in ("warmup", "total", "cooldown", "anneal") else v for k, v in kw.items()}
    by_step = lrs(fn, 12, **kw)
    by_token = lrs(fn, 12, budget_unit="tokens", tokens_per_step=tokens_per_step, **in_tokens)
    assert by_token == pytest.approx(by_step, rel=1e-12)


def test_token_budget_that_is_not_a_whole_number_of_steps():
    # 100 tokens per step, warmup of 250 tokens: steps at tokens 0, 100, 200 warm up, 300 is past
    values = lrs(constant, 4, base=1.0, warmup=250, budget_unit="tokens", tokens_per_step=100)
    assert values == pytest.approx([100 / 350, 200 / 350, 300 / 350, 1.0])


@pytest.mark.parametrize(
    "fn, kw, argument",
    [
        (warmup_cosine, {"warmup": -1, "total": 10}, "warmup"),
        (warmup_cosine, {"warmup": 1, "total": 10, "min_lr_ratio": 1.5}, "min_lr_ratio"),
        (warmup_cosine, {"warmup": 1, "total": 10, "budget_unit": "epochs"}, "budget_unit"),
        (warmup_cosine, {"warmup": 1, "total": 10, "budget_unit": "tokens"}, "tokens_per_step"),
        (warmup_stable_decay, {"warmup": 1, "total": 10, "decay_fraction": 0.0}, "decay_fraction"),
        (warmup_stable_decay, {"warmup": 1, "total": 10, "decay_shape": "exp"}, "decay_shape"),
        (warmup_stable_decay, {"warmup": 1, "total": 0}, "total"),
        (infinite_lr, {"warmup": 1, "cooldown": 2, "constant_ratio": 0.0}, "constant_ratio"),
        (infinite_lr, {"warmup": 1, "cooldown": 2, "constant_ratio": 0.2, "min_lr_ratio": 0.3}, "min_lr_ratio"),
        (infinite_lr, {"warmup": 1, "cooldown": 2, "anneal": 5}, "total"),
    ],
)
def test_nonsense_arguments_name_the_argument(fn, kw, argument):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ScheduleError) as info:
        fn(opt, **kw)
    assert info.value.argument == argument
    assert str(info.value).startswith(argument + " ")
