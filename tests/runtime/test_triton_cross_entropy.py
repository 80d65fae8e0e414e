"""The Triton fused linear cross-entropy (forward and backward) against the reference
(``fused_linear_cross_entropy(impl="torch")``), in Triton's interpreter on CPU.

The interpreter costs about 1 ms a Triton program and a loop step, so the shapes are small: a
program a row, blocks of 32 vocabulary entries (a few, the last one partial), and chunks of rows
as the chunked loss makes them.
"""

import json
import os

# Before torch/triton are imported: Triton reads it once, at import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fgc_runtime.kernels.cross_entropy import LMHeadLoss, fused_linear_cross_entropy  # noqa: E402
from fgc_runtime.kernels.triton.cross_entropy import fused_linear_cross_entropy_triton  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] not in ("", "0") else "cuda"

# fp32: kernel and reference both compute in fp32 and differ in the order of the matmul's and the
# logsumexp's sums (a few ulp, ~1e-7 relative); 1e-5 fails on any real formula error (a dropped
# term, a wrong scale: >= 1e-3 relative). atol covers gradients that cancel to near zero.
FP32_TOL = dict(rtol=1e-5, atol=1e-6)
IGNORE = -100


def make(n, v, d, dtype=torch.float32, bias=False, seed=0, ignored_every=4):
    """hidden (n, d), weight (v, d), labels (n) with every ``ignored_every``-th ignored, bias (v) or None."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 2 / d**0.5  # logits of a few units: a real softmax
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::ignored_every] = IGNORE
    b = torch.randn(v, generator=g) if bias else None
    return (
        hidden.to(dtype).to(DEVICE),
        weight.to(dtype).to(DEVICE),
        labels.to(DEVICE),
        None if b is None else b.to(dtype).to(DEVICE),
    )


def run(impl, hidden, weight, labels, bias, upstream=None, **options):
    """(loss, d hidden, d weight, d bias) of the loss on fresh leaf copies; ``upstream`` is the
    gradient of a ``none`` reduction's losses (ones otherwise)."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, bias=b, impl=impl, **options)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def assert_matches_reference(hidden, weight, labels, bias, **options):
    upstream = None
    if options.get("reduction") == "none":
        upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ours = run("triton", hidden, weight, labels, bias, upstream, **options)
    ref = run("torch", hidden, weight, labels, bias, upstream, **options)
    for name, got, want in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, ref):
        if want is None:
            assert got is None, name
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    return ours


OPTIONS = {
    "plain": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},  # small enough that tanh bends the logits
    "bias": {"bias": True},
    "everything": {"bias": True, "label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "ignore_index": 7},
}


@pytest.mark.parametrize(
    "option,reduction",
    [(name, "mean") for name in OPTIONS]
    + [("plain", "sum"), ("plain", "none"), ("everything", "sum"), ("everything", "none")],
)
def test_every_option_and_reduction_matches_reference(option, reduction):
    options = dict(OPTIONS[option])
    hidden, weight, labels, bias = make(19, 70, 24, bias=options.pop("bias", False), seed=1)
    if "ignore_index" in options:  # a non-default ignore index: -100 is then a real (bad) label, so relabel
        labels = torch.where(labels == IGNORE, torch.full_like(labels, options["ignore_index"]), labels)
    loss, d_hidden, d_weight, _ = assert_matches_reference(hidden, weight, labels, bias, reduction=reduction, **options)
    assert loss.shape == ((19,) if reduction == "none" else ())
    # the comparison means something: real gradients flowed
    assert d_hidden.abs().sum() > 0 and d_weight.abs().sum() > 0


@pytest.mark.parametrize(
    "n,v,d",
    [
        (33, 130, 48),  # five vocabulary blocks, the last one partial
        (1, 5, 3),  # smaller than one block
        (16, 32, 16),  # exactly one block
    ],
)
def test_odd_shapes(n, v, d):
    hidden, weight, labels, bias = make(n, v, d, bias=True, seed=2, ignored_every=5)
    assert_matches_reference(hidden, weight, labels, bias, reduction="mean", z_loss=1e-3, label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_several_chunks_match_one(reduction):
    """Rows in chunks of 4 (the last one partial), every option: the same loss and gradients as
    the reference, which has no chunks."""
    options = dict(OPTIONS["everything"])
    options.pop("ignore_index")
    hidden, weight, labels, bias = make(19, 70, 24, bias=options.pop("bias"), seed=11)
    assert_matches_reference(hidden, weight, labels, bias, reduction=reduction, chunk_size=4, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_rows_give_zero_loss_and_zero_gradients(reduction):
    hidden, weight, labels, bias = make(9, 40, 20, bias=True, seed=3)
    labels = torch.full_like(labels, IGNORE)
    loss, d_hidden, d_weight, d_bias = run(
        "triton", hidden, weight, labels, bias, None, reduction=reduction, z_loss=1e-2, softcap=4.0, label_smoothing=0.1
    )
    for name, t in (("loss", loss), ("d_hidden", d_hidden), ("d_weight", d_weight), ("d_bias", d_bias)):
        assert torch.isfinite(t).all(), name
        assert (t == 0).all(), name


@pytest.mark.parametrize(
    "option,dtype",
    [
        ("plain", torch.bfloat16),
        ("everything", torch.bfloat16),
        # fp16 runs the GPU's matmul path in the interpreter too (tiles multiplied in fp16, the
        # gradient tile rounded to fp16 first); bf16 is upcast there (its arithmetic is wrong)
        ("everything", torch.float16),
    ],
)
def test_half_precision_error_is_at_most_twice_the_references(option, dtype):
    """STYLE.md's rule: against the reference on the same values in fp32, the kernel's bf16 (fp16)
    error is under twice the torch reference's bf16 (fp16) error, for the loss and every gradient."""
    options = dict(OPTIONS[option])
    options.pop("ignore_index", None)
    hidden, weight, labels, bias = make(21, 90, 40, dtype=dtype, bias=options.pop("bias", False), seed=4)
    ours = run("triton", hidden, weight, labels, bias, **options)
    twin = run("torch", hidden, weight, labels, bias, **options)
    exact = run("torch", hidden.float(), weight.float(), labels, None if bias is None else bias.float(), **options)
    for name, got, low, want in zip(("loss", "d_hidden", "d_weight", "d_bias"), ours, twin, exact):
        if want is None:
            continue
        assert got.dtype == low.dtype, name  # gradients come back in the inputs' dtypes
        our_err = (got.float() - want).abs().max()
        twin_err = (low.float() - want).abs().max()
        assert twin_err > 0, name  # the comparison means something
        assert our_err <= 2 * twin_err, (name, our_err.item(), twin_err.item())


def test_batched_labels_through_the_dispatcher_and_lm_head_loss():
    hidden, weight, labels, _ = make(2 * 7, 50, 16, seed=5)
    hidden_BTD, labels_BT = hidden.reshape(2, 7, 16), labels.reshape(2, 7)
    per_token = fused_linear_cross_entropy(hidden_BTD, weight, labels_BT, reduction="none", impl="triton")
    assert per_token.shape == (2, 7)
    torch.testing.assert_close(
        per_token, fused_linear_cross_entropy(hidden_BTD, weight, labels_BT, reduction="none", impl="torch"), **FP32_TOL
    )

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(16, 50, bias=False)
            self.head.weight.data.copy_(weight)

        def hidden_states(self, input_ids):
            return hidden_BTD

        def output_projection(self):
            return self.head.weight, None

    loss_sum, count = LMHeadLoss(Tiny(), impl="triton")(None, labels_BT)
    ref = fused_linear_cross_entropy(hidden_BTD, weight, labels_BT, reduction="sum", impl="torch")
    torch.testing.assert_close(loss_sum, ref, **FP32_TOL)
    assert count.item() == int((labels_BT != IGNORE).sum())


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias"])
def test_gradient_only_for_inputs_that_need_one(needs):
    hidden, weight, labels, bias = make(10, 40, 16, bias=True, seed=6)
    leaves = {"hidden": hidden.clone(), "weight": weight.clone(), "bias": bias.clone()}
    leaves[needs].requires_grad_()
    fused_linear_cross_entropy(
        leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"], impl="triton"
    ).backward()
    ref = {k: v.clone() for k, v in leaves.items()}
    ref[needs] = ref[needs].detach().requires_grad_()
    fused_linear_cross_entropy(ref["hidden"], ref["weight"], labels, bias=ref["bias"], impl="torch").backward()
    torch.testing.assert_close(leaves[needs].grad, ref[needs].grad, **FP32_TOL)


def test_deterministic():
    hidden, weight, labels, bias = make(20, 45, 20, dtype=torch.bfloat16, bias=True, seed=7)
    first = run("triton", hidden, weight, labels, bias, z_loss=1e-3)
    second = run("triton", hidden, weight, labels, bias, z_loss=1e-3)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_no_rows():
    hidden, weight, _, _ = make(1, 8, 4)
    hidden = hidden[:0].clone().requires_grad_()
    loss = fused_linear_cross_entropy_triton(hidden, weight, torch.empty(0, dtype=torch.long, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 4)


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ((3, 4), (5, 6), (3,)),
            "fused_linear_cross_entropy_triton: hidden (N, D) and weight (V, D) must share D, got (3, 4) and (5, 6)",
        ),
        (((3, 4), (5, 4), (2,)), "fused_linear_cross_entropy_triton: labels must be (N,) = (3,), got (2,)"),
    ],
)
def test_bad_shapes_raise(args, message):
    h, w, y = torch.randn(*args[0]), torch.randn(*args[1]), torch.zeros(args[2], dtype=torch.long)
    with pytest.raises(ValueError) as excinfo:
        fused_linear_cross_entropy_triton(h, w, y)
    assert str(excinfo.value) == message


def test_a_label_outside_the_vocabulary_raises_instead_of_counting_as_zero():
    hidden, weight, labels, _ = make(4, 8, 4)
    labels[1] = 8
    with pytest.raises(ValueError, match=r"a label is outside \[0, 8\) and is not ignore_index -100"):
        fused_linear_cross_entropy_triton(hidden, weight, labels)


# -- build time: the select-kernels pass ------------------------------------------------------------

LOSS_BLOCK = "[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n"
ON_CUDA = "[trainer]\n== super()\n    device: cuda\n"
# 8 x 2048 tokens x 4096 vocabulary x 4 bytes = 256 MiB of logits a micro-batch: past auto's threshold
BIG = ("-D", "batch_size=8", "-D", "seq_len=2048", "-D", "vocab_size=4096", "-D", "trainer_type=basic")


def test_auto_chooses_the_triton_loss_on_cuda_when_the_logits_are_large(tmp_path):
    from conftest import run_fgc, small_config

    cuda = small_config(tmp_path, extra=ON_CUDA)
    proc = run_fgc("explain", cuda, *BIG)
    assert proc.returncode == 0, proc.stderr
    assert (
        "kernel cross_entropy: triton (auto: one micro-batch's logits would take 256 MiB (at least 256 MiB): "
        "on cuda, the Triton kernel, a chunk of them at a time; chunks of " in proc.stdout
    )
    # on a device that may be a CPU, the chunked kernel as before
    (tmp_path / "auto").mkdir()
    auto = run_fgc("explain", small_config(tmp_path / "auto"), *BIG)
    assert auto.returncode == 0, auto.stderr
    assert "kernel cross_entropy: chunked (auto:" in auto.stdout


def test_impl_triton_builds_a_trainer_that_runs_the_kernel(tmp_path):
    from conftest import run_fgc, small_config

    cfg = small_config(tmp_path, extra=ON_CUDA + LOSS_BLOCK + "    impl: triton\n    z_loss: 0.001\n")
    out = tmp_path / "build"
    run_fgc("build", cfg, "-o", out, check=True)
    kernels = json.loads((out / "manifest.json").read_text())["plan"]["kernels"]
    # its chunks as the chunked loss's: 64 MiB // (vocab 257 x 8 bytes)
    assert kernels["cross_entropy"] == {
        "impl": "triton",
        "reason": "chosen in the config; chunks of 32,640 tokens: 64 MiB (chunk_budget_mib) // (257 logits x 8 bytes, fp32 and gradient)",
        "chunk_budget_mib": 64.0,
        "chunk_rows": 32640,
    }
    train = (out / "train.py").read_text()
    assert "LMHeadLoss(" in train and 'LOSS_IMPL = "triton"' in train
    assert (out / "fgc_runtime" / "kernels" / "triton" / "cross_entropy.py").is_file()


def test_impl_triton_on_cpu_is_an_error_at_its_line(tmp_path):
    from conftest import line_of, run_fgc, small_config

    cfg = small_config(tmp_path, extra="[trainer]\n== super()\n    device: cpu\n" + LOSS_BLOCK + "    impl: triton\n")
    proc = run_fgc("check", cfg)
    assert proc.returncode == 2
    assert f"cfg.yaml:{line_of(cfg, 'impl: triton')}: error: the triton loss kernel does not run on cpu" in proc.stderr


@pytest.mark.slow  # two builds and two short training runs, one in Triton's interpreter
def test_training_on_the_triton_loss_matches_the_reference(tmp_path):
    import subprocess
    import sys

    from conftest import run_fgc, small_config

    small = (
        "-D",
        "seq_len=16",
        "-D",
        "batch_size=2",
        "-D",
        "max_steps=3",
        "-D",
        "log_every=1",
        "-D",
        "trainer_type=basic",
    )
    curves = {}
    for impl in ("torch", "triton"):
        (tmp_path / impl).mkdir()
        cfg = small_config(tmp_path / impl, extra=LOSS_BLOCK + f"    impl: {impl}\n    z_loss: 0.001\n")
        out = tmp_path / impl / "build"
        run_fgc("build", cfg, "-o", out, *small, check=True)
        ran = subprocess.run(
            [sys.executable, "train.py", "--output-dir", str(out / "run"), "--resume", "never", "--device", "cpu"],
            cwd=out,
            env=dict(os.environ, TRITON_INTERPRET="1"),
            capture_output=True,
            text=True,
        )
        assert ran.returncode == 0, ran.stderr
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        curves[impl] = [r["loss"] for r in records if "loss" in r]
    assert len(curves["torch"]) == len(curves["triton"]) == 3
    # fp32 on both sides; the sums differ in order only
    assert curves["triton"] == pytest.approx(curves["torch"], rel=1e-5, abs=1e-6)
    assert curves["torch"][0] != curves["torch"][-1]  # it trained


def test_no_gradient_work_under_no_grad(monkeypatch):
    # evaluation runs the loss under torch.no_grad(): the forward must not compute gradients
    import fgc_runtime.kernels.triton.cross_entropy as kernel

    needs = []
    real = kernel.run_chunks
    monkeypatch.setattr(kernel, "run_chunks", lambda *args: needs.append(args[6]) or real(*args))
    hidden, weight, labels, _ = make(10, 40, 16, seed=8)
    weight.requires_grad_()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, impl="triton")
    assert needs == [(False, False, False)]  # the chunks ran for the loss alone
    torch.testing.assert_close(
        loss, fused_linear_cross_entropy(hidden, weight, labels, impl="torch").detach(), **FP32_TOL
    )


def test_autocast_mixed_precision_casts_like_the_reference():
    """Mixed precision: bf16 hidden states and an fp32 head weight under autocast, as a bf16-mixed
    trainer gives them; the weight's gradient comes back in fp32, within the bf16 rule."""
    hidden, weight, labels, bias = make(21, 90, 40, bias=True, seed=10)
    exact = run("torch", hidden, weight, labels, bias, z_loss=1e-3)
    results = {}
    for impl in ("triton", "torch"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            results[impl] = run(impl, hidden.to(torch.bfloat16), weight, labels, bias, z_loss=1e-3)
    for name, got, low, want in zip(
        ("loss", "d_hidden", "d_weight", "d_bias"), results["triton"], results["torch"], exact
    ):
        assert got.dtype == low.dtype, name  # d_weight and d_bias in fp32, d_hidden in bf16
        our_err = (got.float() - want).abs().max()
        twin_err = (low.float() - want).abs().max()
        assert twin_err > 0, name
        assert our_err <= 2 * twin_err, (name, our_err.item(), twin_err.item())
