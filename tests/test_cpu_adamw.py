"""fgc_runtime.cpu_adamw: the fused AdamW step's CPU kernel (C, built on first use) gives the
weights, states and step counts of the compiled function it stands in for, bitwise; steps the
tensors it supports and leaves the others to the compiled function; falls back, with a warning,
where it does not build; and leaves nothing on disk."""

from __future__ import annotations

import copy
import os
import pickle
import warnings

import pytest
import torch

from fgc_runtime import cpu_adamw
from fgc_runtime.errors import RunError
from fgc_runtime.optim import AdamW

# sizes around the kernel's chunk (16384 values a task) and its vectors (16 and 32 values)
SHAPES = [(130, 257), (16384,), (16385,), (7, 13), (31,), (), (3, 5, 6)]


def weights(dtype, grad_dtype, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((0.1 * torch.randn(s, generator=gen)).to(dtype)) for s in shapes]
    for p in params:
        p.grad_dtype = grad_dtype
    return params


def steps(params, opt, count, grad_dtype, lrs=(1e-2, 7e-3, 5e-3, 3e-3, 1e-3)):
    """COUNT steps with reproducible gradients in GRAD_DTYPE and a changing lr."""
    gen = torch.Generator().manual_seed(1)
    for step in range(count):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * (1 + step % 3)).to(grad_dtype)
        for group in opt.param_groups:
            group["lr"] = lrs[step % len(lrs)]
        opt.step()


def adamw(params, kernel: bool, **kw) -> AdamW:
    groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0}]
    opt = AdamW(groups, lr=1e-2, betas=(0.9, 0.95), seed=11, fused=True, **kw)
    opt._cpu_kernel = kernel
    return opt


def bits(t: torch.Tensor) -> torch.Tensor:
    """T's bit pattern (NaNs compare by their bits)."""
    return t.detach().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def assert_same(ours, theirs, ours_opt, theirs_opt):
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        assert torch.equal(bits(a), bits(b))
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(bits(ours_opt.state[a][key]), bits(theirs_opt.state[b][key])), key


@pytest.fixture(autouse=True)
def fresh_compiled_function():
    """Each test's compiled function compiled afresh: the tests call it with many lists of
    tensors, and past torch.compile's limit of recompilations it would run eagerly."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def kernel_calls(monkeypatch):
    """The number of tensors the CPU kernel stepped in each of its calls."""
    calls = []
    step = cpu_adamw.step

    def counting(lib, tensors, rows, keys):
        calls.append(len(tensors))
        return step(lib, tensors, rows, keys)

    monkeypatch.setattr(cpu_adamw, "step", counting)
    return calls


def test_the_kernel_builds_here():
    lib, why_not = cpu_adamw.library()
    assert lib is not None and why_not == ""


@pytest.mark.parametrize("rounding", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32 grads", "bf16 grads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32 weights", "bf16 weights"])
def test_the_kernel_gives_the_compiled_functions_values_bitwise(dtype, grad_dtype, rounding, kernel_calls):
    ours, theirs = weights(dtype, grad_dtype), weights(dtype, grad_dtype)
    ours_opt = adamw(ours, kernel=True, bf16_stochastic_round=rounding)
    theirs_opt = adamw(theirs, kernel=False, bf16_stochastic_round=rounding)
    steps(ours, ours_opt, 5, grad_dtype)
    steps(theirs, theirs_opt, 5, grad_dtype)
    assert kernel_calls == [len(SHAPES)] * 5  # every tensor, every step, by the kernel
    assert_same(ours, theirs, ours_opt, theirs_opt)
    assert all(ours_opt.state[p]["step"] == 5 for p in ours)
    # and the weights moved (bf16 ones rounded stochastically are not all the nearest value)
    assert not any(torch.equal(a, b) for a, b in zip(ours, weights(dtype, grad_dtype)) if a.numel() > 1)


def test_the_kernel_rounds_non_finite_values_as_torch():
    def run(kernel):
        params = weights(torch.bfloat16, torch.bfloat16, shapes=[(64,)])
        with torch.no_grad():
            params[0][:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), 3e38])
        opt = adamw(params, kernel, bf16_stochastic_round=True)
        opt.param_groups[0]["weight_decay"] = 0.0
        steps(params, opt, 1, torch.bfloat16)
        return params, opt

    (ours, ours_opt), (theirs, theirs_opt) = run(True), run(False)
    assert_same(ours, theirs, ours_opt, theirs_opt)
    assert torch.isposinf(ours[0][0]) and torch.isneginf(ours[0][1]) and torch.isnan(ours[0][2])


def test_the_kernel_shares_the_values_among_threads_as_one_thread_does():
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            params = weights(torch.bfloat16, torch.bfloat16, shapes=[(5, 16384), (40000,), (9,)])
            opt = adamw(params, True, bf16_stochastic_round=True)
            steps(params, opt, 3, torch.bfloat16)
            results.append((params, opt))
    finally:
        torch.set_num_threads(threads)
    (one, one_opt), (two, two_opt) = results
    assert_same(one, two, one_opt, two_opt)


def test_tensors_the_kernel_does_not_take_go_to_the_compiled_function(kernel_calls):
    """An fp16 weight and a gradient that is not contiguous: stepped by the compiled function in
    the same step as the kernel's tensors, with the same values as a step without the kernel."""
    def run(kernel):
        params = weights(torch.bfloat16, torch.bfloat16, shapes=[(8, 6), (40,), (12,)])
        params[2] = torch.nn.Parameter(params[2].detach().to(torch.float16))
        opt = adamw(params, kernel, bf16_stochastic_round=True)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            params[0].grad = params[0].grad.t().contiguous().t()  # same values, transposed strides
            assert not params[0].grad.is_contiguous()
            opt.step()
        return params, opt

    (ours, ours_opt), (theirs, theirs_opt) = run(True), run(False)
    assert kernel_calls == [1, 1, 1]  # the contiguous bf16 one
    assert_same(ours, theirs, ours_opt, theirs_opt)


def test_the_kernel_moves_version_counters():
    """Written through their addresses, the weights and states still look modified to autograd."""
    params = weights(torch.bfloat16, torch.bfloat16, shapes=[(10,)])
    opt = adamw(params, True)
    steps(params, opt, 1, torch.bfloat16)
    state = opt.state[params[0]]
    before = [t._version for t in (params[0], state["exp_avg"], state["exp_avg_sq"], state["step"])]
    steps(params, opt, 1, torch.bfloat16)
    after = [t._version for t in (params[0], state["exp_avg"], state["exp_avg_sq"], state["step"])]
    assert all(b > a for a, b in zip(before, after))


def test_without_a_compiler_the_step_warns_once_and_runs_compiled(monkeypatch, kernel_calls):
    monkeypatch.setattr(cpu_adamw, "_built", None)
    monkeypatch.setattr(cpu_adamw.shutil, "which", lambda name: None)
    ours = weights(torch.bfloat16, torch.bfloat16)
    ours_opt = adamw(ours, True, bf16_stochastic_round=True)
    with pytest.warns(UserWarning, match=r"the CPU kernel did not build \(no C compiler found \(looked for cc, "
                                         r"gcc, clang\)\); the step runs compiled by torch.compile instead"):
        steps(ours, ours_opt, 1, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        steps(ours, ours_opt, 2, torch.bfloat16)
    theirs = weights(torch.bfloat16, torch.bfloat16)
    theirs_opt = adamw(theirs, False, bf16_stochastic_round=True)
    steps(theirs, theirs_opt, 1, torch.bfloat16)
    steps(theirs, theirs_opt, 2, torch.bfloat16)
    assert kernel_calls == []
    assert_same(ours, theirs, ours_opt, theirs_opt)


def test_without_any_compiler_the_step_is_a_one_line_error(monkeypatch):
    """No C compiler for the kernel, and none for torch.compile either: a RunError (which the
    generated trainer prints as one line, exit status 2) that says what to do."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(cpu_adamw, "_built", None)
    monkeypatch.setattr(cpu_adamw.shutil, "which", lambda name: None)
    params = weights(torch.bfloat16, torch.bfloat16, shapes=[(9,)])
    opt = adamw(params, True, bf16_stochastic_round=True)
    # inductor's own way to change its settings for a while (monkeypatch's undo breaks its config)
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++"), "fx_graph_cache": False}):
        with pytest.warns(UserWarning, match="the CPU kernel did not build"):
            with pytest.raises(RunError) as error:
                steps(params, opt, 1, torch.bfloat16)
    assert str(error.value) == (
        "error: fgc_runtime.optim.AdamW(fused=True) needs a C compiler on the CPU: its C kernel did not build "
        "(no C compiler found (looked for cc, gcc, clang)), nor did torch.compile's step (InvalidCxxCompiler: No "
        "working C++ compiler found in torch._inductor.config.cpp.cxx: (None, '/nonexistent/g++')); install one "
        "(cc, gcc or clang), or build without -D fused_optimizer=true"
    )


def test_a_build_leaves_nothing_on_disk(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_adamw.tempfile, "tempdir", str(tmp_path))
    lib, why_not = cpu_adamw._build()
    assert lib is not None and why_not == ""
    assert list(tmp_path.iterdir()) == []
    # a compiler that fails every time: why, and still nothing left
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cc").write_text("#!/bin/sh\necho 'cc: error: no such flag' >&2\nexit 1\n")
    os.chmod(fake / "cc", 0o755)
    monkeypatch.setattr(cpu_adamw, "_COMPILERS", ("cc",))
    monkeypatch.setenv("PATH", str(fake))
    lib, why_not = cpu_adamw._build()
    assert lib is None and why_not == f"{fake / 'cc'}: cc: error: no such flag"
    assert [p.name for p in tmp_path.iterdir()] == ["bin"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_fused_optimizer_steps_as_the_original(how):
    """torch's optimizer copies only its defaults, state and groups: fused, the seed and the
    generators' states come along too."""
    params = weights(torch.bfloat16, torch.bfloat16, shapes=[(50,), (7,)])
    opt = adamw(params, True, bf16_stochastic_round=True)
    steps(params, opt, 2, torch.bfloat16)
    pair = {"params": params, "opt": opt}
    copied = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert copied["opt"].fused and copied["opt"]._seed == 11
    steps(params, opt, 2, torch.bfloat16)
    steps(copied["params"], copied["opt"], 2, torch.bfloat16)
    assert_same(params, copied["params"], opt, copied["opt"])
