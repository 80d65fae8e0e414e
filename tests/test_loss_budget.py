"""The chunked loss sized by a memory budget (issue #20, items 1 and 4): the rows of a chunk from
the budget, its values and gradients against the reference for every option, the plan's
statement of the chunk and `fgc explain`'s loss-head memory under each implementation."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import EXAMPLE, line_of, run_fgc, small_config
from fgc_runtime.kernels.cross_entropy import (
    DEFAULT_CHUNK_BUDGET,
    LMHeadLoss,
    _ChunkedLinearCrossEntropy,
    chunk_rows,
    fused_linear_cross_entropy,
)

LOSS_BLOCK = "[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n"

# -- the rows of a chunk ----------------------------------------------------------------------------


def test_chunk_rows_is_the_budget_over_eight_bytes_a_logit():
    assert DEFAULT_CHUNK_BUDGET == 64 * 2**20
    assert chunk_rows(32000) == 262  # 67,108,864 // 256,000
    assert chunk_rows(128256) == 65  # 67,108,864 // 1,026,048
    assert chunk_rows(50, 50 * 8 * 7) == 7
    assert chunk_rows(50, 50 * 8 * 7 + 399) == 7
    assert chunk_rows(50, 50 * 8 * 7 - 1) == 6
    assert chunk_rows(10**6, 1) == 1  # a budget under one row still runs a row at a time
    with pytest.raises(ValueError, match="at least 1"):
        chunk_rows(0)


def _recorded_chunk_size(monkeypatch) -> list:
    """Patch the chunked autograd function to record the chunk size it is called with."""
    seen = []
    apply = _ChunkedLinearCrossEntropy.apply

    def spy(*args):
        seen.append(args[-2])  # (..., chunk_size, mean)
        return apply(*args)

    monkeypatch.setattr(_ChunkedLinearCrossEntropy, "apply", spy)
    return seen


def test_the_chunk_comes_from_the_budget_unless_a_size_is_given(monkeypatch):
    seen = _recorded_chunk_size(monkeypatch)
    h, w, y = torch.randn(40, 8), torch.randn(50, 8), torch.randint(0, 50, (40,))
    fused_linear_cross_entropy(h, w, y, impl="chunked")
    fused_linear_cross_entropy(h, w, y, impl="chunked", chunk_budget=50 * 8 * 3)
    fused_linear_cross_entropy(h, w, y, impl="chunked", chunk_size=5, chunk_budget=50 * 8 * 3)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(w.clone())

        def hidden_states(self, ids):
            return h[: ids.numel()].reshape(*ids.shape, 8)

        def output_projection(self):
            return self.w, None

    ids = torch.zeros(4, 10, dtype=torch.long)
    LMHeadLoss(Head(), chunk_budget=50 * 8 * 11)(ids, y.reshape(4, 10))
    assert seen == [chunk_rows(50), 3, 5, 11]


# -- values and gradients ---------------------------------------------------------------------------


def _loss_and_grads(impl, hidden, weight, bias, labels, **options):
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias=bias, impl=impl, **options)
    inputs = [hidden, weight] + ([bias] if bias is not None else [])
    return loss, torch.autograd.grad(loss * 1.7, inputs)


def _inputs(N, D, V, bias, dtype=torch.float32, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = ignore_index
    return hidden, weight, b, labels


OPTIONS = list(
    itertools.product(
        [False, True],  # bias
        [-100, 7],  # ignore_index (7 is also a class id: its rows are ignored, the class is not)
        ["sum", "mean"],
        [0.0, 0.1],  # label smoothing
        [0.0, 1e-2],  # z-loss
        [None, 4.0],  # soft-capping
    )
)


@pytest.mark.parametrize("bias,ignore_index,reduction,label_smoothing,z_loss,softcap", OPTIONS)
def test_budgeted_chunks_equal_the_reference(bias, ignore_index, reduction, label_smoothing, z_loss, softcap):
    # V = 50: a budget of 7 rows; 37 rows make five chunks of 7 and one of 2
    hidden, weight, b, labels = _inputs(37, 16, 50, bias, ignore_index=ignore_index)
    options = dict(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap,
    )
    ref, ref_grads = _loss_and_grads("torch", hidden, weight, b, labels, **options)
    got, got_grads = _loss_and_grads("chunked", hidden, weight, b, labels, chunk_budget=50 * 8 * 7, **options)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "shape,D,V,budget",
    [
        ((1,), 3, 2, DEFAULT_CHUNK_BUDGET),  # one row, two classes
        ((3, 11), 5, 3, 3 * 8 * 4),  # a batch of sequences (B, T): 33 rows in chunks of 4 and one of 1
        ((2, 7), 9, 1001, 1),  # a budget under one row: one row at a time
        ((13,), 4, 17, DEFAULT_CHUNK_BUDGET),  # one chunk larger than the input
    ],
)
def test_odd_shapes(shape, D, V, budget):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(*shape, D, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    labels = torch.randint(0, V, shape, generator=g)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    ref, ref_grads = _loss_and_grads("torch", hidden, weight, None, labels, **options)
    got, got_grads = _loss_and_grads("chunked", hidden, weight, None, labels, chunk_budget=budget, **options)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got_grads[0].shape == hidden.shape
    for a, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_an_all_ignored_batch_is_zero_loss_and_zero_gradients(reduction):
    hidden, weight, b, labels = _inputs(23, 8, 30, bias=True)
    labels[:] = -100
    # large logits: an ignored row must not turn exp overflow into NaN
    with torch.no_grad():
        hidden.mul_(100.0)
    loss, grads = _loss_and_grads(
        "chunked", hidden, weight, b, labels, reduction=reduction, label_smoothing=0.1, z_loss=1e-2,
        softcap=5.0, chunk_budget=30 * 8 * 4,
    )
    assert loss.item() == 0.0
    for g in grads:
        assert not g.isnan().any()
        assert torch.count_nonzero(g) == 0


def test_bf16_inputs_are_as_close_to_fp32_as_the_reference_is():
    # the tolerance rule of the kernels (benchmarks/kernels.py): in bf16, the kernel's error
    # against an fp32 reference is at most twice the bf16 reference's error, or one bf16 epsilon
    # of the reference's largest value
    hidden, weight, b, labels = _inputs(45, 32, 200, bias=True, dtype=torch.bfloat16)
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0)
    exact = [t.detach().float().requires_grad_() for t in (hidden, weight, b)]
    truth, truth_grads = _loss_and_grads("torch", *exact[:2], exact[2], labels, **options)
    ref, ref_grads = _loss_and_grads("torch", hidden, weight, b, labels, **options)
    got, got_grads = _loss_and_grads("chunked", hidden, weight, b, labels, chunk_budget=200 * 8 * 8, **options)
    eps = torch.finfo(torch.bfloat16).eps
    for g, r, t in zip([got, *got_grads], [ref, *ref_grads], [truth, *truth_grads]):
        assert g.dtype == r.dtype
        ref_err = (r.float() - t).abs().max()
        got_err = (g.float() - t).abs().max()
        assert got_err <= max(2 * ref_err, eps * t.abs().max()), (got_err, ref_err)


def test_reduction_none_is_still_refused():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction='none'"):
        fused_linear_cross_entropy(h, w, y, reduction="none", impl="chunked")
    with pytest.raises(ValueError, match="chunk_size must be at least 1, got 0"):
        fused_linear_cross_entropy(h, w, y, impl="chunked", chunk_size=0)


# -- the plan and fgc explain -----------------------------------------------------------------------

BIG = ["-D", "vocab_size=4096", "-D", "trainer_type=basic"]
# a config's own [loss] block replaces the library's (and its loss_impl knob)
CHUNKED = LOSS_BLOCK + "    impl: chunked\n"


def test_the_plan_states_the_budget_and_the_rows(tmp_path):
    # 4 sequences x 32 tokens = 128 tokens a micro-batch; a 1 MiB budget holds 1 MiB // (4,096 x 8)
    # = 32 rows
    path = small_config(tmp_path, extra=CHUNKED + "    chunk_budget_mib: 1\n")
    out = tmp_path / "pkg"
    run_fgc("build", path, "-o", out, *BIG, check=True)
    choice = json.loads((out / "manifest.json").read_text())["plan"]["kernels"]["cross_entropy"]
    assert choice["impl"] == "chunked"
    assert choice["chunk_budget_mib"] == 1
    assert choice["chunk_rows"] == 32
    assert choice["reason"] == (
        "chosen in the config; chunks of 32 tokens: 1 MiB (chunk_budget_mib) // "
        "(4,096 logits x 8 bytes, fp32 and gradient)"
    )

    proc = run_fgc("explain", path, *BIG)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    start = lines.index("loss head memory per micro-batch (128 tokens x 4,096 vocabulary):")
    torch_line, chunked_line = lines[start + 1], lines[start + 2]
    # 3 x 128 x 4,096 x 4 bytes = 6 MiB; one chunk's 32 x 4,096 x 8 bytes = 1 MiB, the head's weight
    # gradient 4,096 x 32 x 4 = 0.5 MiB and the hidden states' 128 x 32 x 4 = 16 KiB
    assert torch_line.split() == ["torch", "6.0", "MiB", "every", "fp32", "logit,", "their", "log-softmax", "and", "its", "gradient"]
    assert chunked_line.startswith("  chunked       1.5 MiB  4 chunks of 32 tokens (1 MiB budget): ")
    assert chunked_line.endswith("(chosen)")
    assert "kernel cross_entropy: chunked (chosen in the config; chunks of 32 tokens" in proc.stdout


def test_the_memory_estimate_counts_the_chosen_loss_head():
    from fgc.build import compile_config
    from fgc.explain import loss_head_memory, memory_estimate, model_facts

    variables = {"vocab_size": 4096, "trainer_type": "basic"}
    estimates = {}
    for impl in ("torch", "chunked"):
        compiled = compile_config(EXAMPLE, variables=variables | {"loss_impl": impl})
        facts = model_facts(compiled)
        heads = loss_head_memory(compiled, facts)
        estimates[impl] = (memory_estimate(compiled, facts)["activations"], heads)
    (torch_act, heads), (chunked_act, _) = estimates["torch"], estimates["chunked"]
    # 16 sequences x 128 tokens x 4,096 x 4 bytes, three times
    assert heads["torch"]["bytes"] == 3 * 2048 * 4096 * 4
    # 2,048 rows a chunk (64 MiB // 32 KiB): one chunk of the 2,048 tokens; the head's weight
    # gradient (4,096 x 96 fp32) and the hidden states' (2,048 x 96 fp32)
    assert heads["chunked"]["bytes"] == 2048 * 4096 * 8 + 4096 * 96 * 4 + 2048 * 96 * 4
    assert torch_act - chunked_act == heads["torch"]["bytes"] - heads["chunked"]["bytes"]


def test_explain_shows_the_chunked_head_where_the_config_cannot_use_it(tmp_path):
    # soft-capping, which the trainer does not pass to the chunked loss (the fsdp2 trainer itself
    # runs the chunked loss: tests/test_loss_trainers.py)
    path = small_config(
        tmp_path, extra="[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n    softcap: 30.0\n"
    )
    proc = run_fgc("explain", path, "-D", "vocab_size=4096", "-D", "trainer_type=fsdp2")
    assert proc.returncode == 0, proc.stderr
    assert "  torch         3.0 MiB  every fp32 logit, their log-softmax and its gradient  (chosen)" in proc.stdout
    # 64 tokens a micro-batch (2 ranks), the default budget: 2,048 rows a chunk
    assert (
        "  chunked       2.5 MiB  1 chunk of 64 tokens (the 64 MiB budget allows 2,048): one chunk's fp32 "
        "logits and gradient, and the head's weight and hidden-state gradients from the forward  "
        "(not with softcap)"
    ) in proc.stdout


def test_a_fixed_chunk_size_and_a_budget_too_small_for_one_row(tmp_path):
    fixed = small_config(tmp_path, extra=CHUNKED + "    chunk_size: 100\n")
    proc = run_fgc("explain", fixed, *BIG)
    assert proc.returncode == 0, proc.stderr
    assert (
        "kernel cross_entropy: chunked (chosen in the config; chunks of 100 tokens (chunk_size): "
        "3.1 MiB of fp32 logits and gradient each)"
    ) in proc.stdout
    assert "  chunked       3.6 MiB  2 chunks of 100 tokens (chunk_size): " in proc.stdout

    (tmp_path / "small").mkdir()
    tiny = small_config(tmp_path / "small", extra=CHUNKED + "    chunk_budget_mib: 0.01\n")
    proc = run_fgc("check", tiny, *BIG)
    assert proc.returncode == 2
    assert proc.stderr.endswith(
        f"cfg.yaml:{line_of(tiny, 'chunk_budget_mib')}: error: chunk_budget_mib 0.01 cannot hold one token's "
        "fp32 logits and their gradient (4,096 x 8 bytes = 0.03125 MiB)\n  hint: use at least 0.03125\n"
    ), proc.stderr
    assert len(proc.stderr.splitlines()) == 2


def test_the_chunk_settings_are_an_error_when_the_loss_is_not_chunked(tmp_path):
    path = small_config(tmp_path, extra=LOSS_BLOCK + "    impl: torch\n    chunk_budget_mib: 16\n")
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    assert (
        f"cfg.yaml:{line_of(path, 'chunk_budget_mib')}: error: chunk_budget_mib has no effect with the torch "
        "loss (chosen in the config): it sizes the chunked and Triton losses' chunks\n"
    ) in proc.stderr


def test_the_budget_knob_reaches_the_trainer(tmp_path):
    """-D loss_chunk_budget_mib sets the chunked loss's budget in train.py (and only with the
    chunked loss: with another it has no effect, an error)."""
    out = tmp_path / "pkg"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "loss_impl=chunked", "-D", "trainer_type=basic",
            "-D", "loss_chunk_budget_mib=0.25", check=True)
    src = (out / "train.py").read_text()
    assert "LOSS_CHUNK_BUDGET_MIB = 0.25  # -D loss_chunk_budget_mib=0.25" in src
    assert "chunk_budget=int(LOSS_CHUNK_BUDGET_MIB * 2**20)," in src
    plan = json.loads((out / "manifest.json").read_text())["plan"]["kernels"]["cross_entropy"]
    assert (plan["chunk_budget_mib"], plan["chunk_rows"]) == (0.25, 127)  # 0.25 MiB // (257 x 8 bytes)
    proc = run_fgc("build", EXAMPLE, "-o", tmp_path / "no", "-D", "loss_chunk_budget_mib=8")
    assert proc.returncode == 2 and "chunk_budget_mib has no effect with the torch loss" in proc.stderr
