"""The loss kernels and their selection, the optimizer step in the backward, and fp16-mixed: the
build-time rules (each an error at the offending line) and what the generated trainer does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import EXAMPLE, line_of, run_fgc, small_config, tiny_causal_lm
from fgc_runtime.kernels import fused_linear_cross_entropy
from fgc_runtime.kernels.cross_entropy import cross_entropy_sum_and_count

# -- the kernel -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-2)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chunked_loss_equals_the_reference_with_gradients(bias, label_smoothing, z_loss, reduction):
    torch.manual_seed(0)
    N, D, V = 37, 16, 50
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    b = torch.randn(V, requires_grad=True) if bias else None
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100
    results = []
    for impl in ("torch", "chunked"):
        loss = fused_linear_cross_entropy(
            hidden, weight, labels, bias=b, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, impl=impl, chunk_size=8,
        )
        grads = torch.autograd.grad(loss * 1.7, [hidden, weight] + ([b] if bias else []))
        results.append((loss, grads))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_the_reference_matches_the_definition():
    torch.manual_seed(1)
    hidden, weight = torch.randn(6, 4), torch.randn(9, 4)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    logits = hidden @ weight.T
    capped = 5.0 * torch.tanh(logits / 5.0)
    valid = labels != -100
    expected = torch.nn.functional.cross_entropy(capped, labels, label_smoothing=0.1) + 0.01 * (
        torch.logsumexp(capped, -1)[valid].square().mean()
    )
    got = fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(got, expected)
    loss_sum, count = cross_entropy_sum_and_count(logits, labels, label_smoothing=0.1, z_loss=0.01, softcap=5.0)
    torch.testing.assert_close(loss_sum / count, expected)
    assert count.item() == 5


def test_a_feature_the_kernel_lacks_is_an_error_not_dropped():
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="reduction='none'"):
        fused_linear_cross_entropy(h, w, y, reduction="none", impl="chunked")
    with pytest.raises(ValueError, match="the triton implementation of fused_linear_cross_entropy does not support reduction='max'"):
        fused_linear_cross_entropy(h, w, y, reduction="max", impl="triton")
    assert fused_linear_cross_entropy(h, w, y, reduction="none").shape == (4,)


# -- build-time rules -------------------------------------------------------------------------------


LOSS_BLOCK = "[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n"


@pytest.mark.parametrize(
    "meta,loss,bad,message",
    [
        ("", "    impl: chunked\n    softcap: 30.0\n", "softcap: 30.0", "the chunked loss kernel does not support softcap: it would be dropped"),
        ("", "    impl: triton\n[trainer]\n== super()\n    device: cpu\n", "impl: triton", "the triton loss kernel does not run on cpu"),
        ("", "    label_smoothing: 1.5\n", "label_smoothing: 1.5", "label_smoothing must be 0 or more and less than 1, got 1.5"),
    ],
)
def test_loss_kernel_rules(tmp_path, meta, loss, bad, message):
    path = small_config(tmp_path, meta, LOSS_BLOCK + loss)
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert f"cfg.yaml:{line_of(path, bad)}: error: {message}" in proc.stderr


def test_auto_chooses_the_chunked_loss_when_the_logits_are_large(tmp_path):
    small = small_config(tmp_path)
    out = tmp_path / "small"
    run_fgc("build", small, "-o", out, check=True)
    kernels = json.loads((out / "manifest.json").read_text())["plan"]["kernels"]
    assert kernels["cross_entropy"]["impl"] == "torch"
    assert "LMHeadLoss" not in (out / "train.py").read_text()
    # 8 x 2048 tokens x 4096 vocabulary x 4 bytes = 256 MiB of logits a micro-batch
    big = run_fgc("explain", small, "-D", "batch_size=8", "-D", "seq_len=2048", "-D", "vocab_size=4096",
                  "-D", "trainer_type=basic")
    assert big.returncode == 0, big.stderr
    assert "kernel cross_entropy: chunked (auto: one micro-batch's logits would take 256 MiB" in big.stdout
    # ...but not for a feature the chunked kernel lacks
    capped = small_config(tmp_path, extra=LOSS_BLOCK + "    softcap: 30.0\n")
    proc = run_fgc("explain", capped, "-D", "batch_size=8", "-D", "seq_len=2048", "-D", "vocab_size=4096",
                   "-D", "trainer_type=basic")
    assert "kernel cross_entropy: torch (auto: the reference (the chunked kernel does not support softcap))" in proc.stdout


@pytest.mark.parametrize(
    "meta,message",
    [
        ('-- set ns.trainer_type = "ddp"\n', "optimizer_in_backward cannot be combined with the ddp trainer"),
        ("-- set ns.grad_clip = 1.0\n", "optimizer_in_backward cannot be combined with gradient clipping"),
        ("-- set ns.grad_clip = none\n-- set ns.micro_batch_size = 2\n",
         "optimizer_in_backward cannot be combined with gradient accumulation (2 micro-batches a step)"),
        ('-- set ns.grad_clip = none\n-- set ns.precision = "fp16-mixed"\n', "optimizer_in_backward cannot be combined with fp16-mixed"),
    ],
)
def test_optimizer_in_backward_rules(tmp_path, meta, message):
    path = small_config(tmp_path, '-- set ns.trainer_type = "basic"\n' + meta + "-- set ns.optimizer_in_backward = true\n")
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    # the hint names the user's line that turned it on
    assert f"cfg.yaml:{line_of(path, 'ns.optimizer_in_backward = true')}" in proc.stderr


def test_fp16_is_rejected_with_fsdp2(tmp_path):
    path = small_config(tmp_path, '-- set ns.trainer_type = "fsdp2"\n-- set ns.precision = "fp16-mixed"\n')
    proc = run_fgc("check", path)
    assert proc.returncode == 2
    assert "fp16-mixed is not supported with FSDP2" in proc.stderr
    assert f"cfg.yaml:{line_of(path, 'fp16-mixed')}" in proc.stderr


# -- training ---------------------------------------------------------------------------------------


def _train(out: Path, run: Path, *flags) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(run), "--log-every", "1", *map(str, flags)],
        capture_output=True, text=True, cwd=run.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


BASIC = ["-D", "trainer_type=basic", "-D", "max_steps=4", "-D", "eval_every=0", "-D", "num_hidden_layers=2"]


@pytest.mark.slow
def test_optimizer_in_backward_takes_the_same_steps_and_resumes_exactly(tmp_path):
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    run_fgc("build", EXAMPLE, "-o", plain, *BASIC, "-D", "grad_clip=null", check=True)
    run_fgc("build", EXAMPLE, "-o", fused, *BASIC, "-D", "grad_clip=null", "-D", "optimizer_in_backward=true", check=True)
    assert "OptimizerInBackward" in (fused / "train.py").read_text()
    reference = _train(plain, tmp_path / "run_plain")
    records = _train(fused, tmp_path / "run_fused")
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference], rel=1e-6)
    assert all(r["grad_norm"] is None for r in records)  # the gradients are gone: not measured
    _train(fused, tmp_path / "part", "--max-steps", "2")
    assert [r["loss"] for r in _train(fused, tmp_path / "part")] == [r["loss"] for r in records]


@pytest.mark.slow
def test_fp16_mixed_trains_and_resumes_exactly(tmp_path):
    out = tmp_path / "fp16"
    run_fgc("build", EXAMPLE, "-o", out, *BASIC, "-D", "precision=fp16-mixed", check=True)
    text = (out / "train.py").read_text()
    # the scaler, and the forward under autocast (fgc_runtime.train.autocast: float16 for fp16-mixed)
    assert "torch.amp.GradScaler" in text and "PRECISION = 'fp16-mixed'" in text.replace('"', "'")
    assert "with autocast(PRECISION, dist.device):" in text
    full = [r["loss"] for r in _train(out, tmp_path / "full")]
    assert full[-1] < full[0]
    _train(out, tmp_path / "part", "--max-steps", "2")
    assert [r["loss"] for r in _train(out, tmp_path / "part")] == full
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004" / "trainer_state.pt", weights_only=False)
    assert state["grad_scaler"]["scale"] > 0


@pytest.mark.slow
def test_chunked_loss_trains_like_the_reference(tmp_path):
    ref, chunked, smooth = tmp_path / "ref", tmp_path / "chunked", tmp_path / "smooth"
    run_fgc("build", EXAMPLE, "-o", ref, *BASIC, check=True)
    run_fgc("build", EXAMPLE, "-o", chunked, *BASIC, "-D", "loss_impl=chunked", check=True)
    assert "LMHeadLoss(" in (chunked / "train.py").read_text()
    reference = [r["loss"] for r in _train(ref, tmp_path / "r1")]
    assert [r["loss"] for r in _train(chunked, tmp_path / "r2")] == pytest.approx(reference, rel=1e-5)
    # label smoothing goes through the loss function the trainer defines, and changes the loss
    cfg = tmp_path / "smooth.yaml"
    cfg.write_text(
        f'-- extends "{EXAMPLE}"\n'
        "[loss]\n.loss: &loss !singleton:fgc.settings:LossSettings@loss\n    label_smoothing: 0.1\n"
    )
    run_fgc("build", cfg, "-o", smooth, *BASIC, check=True)
    assert "def lm_loss(" in (smooth / "train.py").read_text()
    smoothed = [r["loss"] for r in _train(smooth, tmp_path / "r3")]
    assert smoothed[0] != pytest.approx(reference[0], rel=1e-4)
    assert smoothed[-1] < smoothed[0]


# -- document masking -------------------------------------------------------------------------------


def test_document_ids_and_the_masking_wrapper_keep_documents_apart():
    from fgc_runtime.data import DocumentMasking, document_ids

    ids = torch.tensor([[5, 6, 9, 7, 9, 8, 8]])  # eos 9 ends a document and belongs to it
    assert document_ids(ids, 9).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    torch.manual_seed(0)
    model = tiny_causal_lm(10).eval()
    with torch.no_grad():
        packed = DocumentMasking(model, eos_id=9)(ids)
        alone = [model(ids[:, a:b]) for a, b in ((0, 3), (3, 5), (5, 7))]
        plain = model(ids)
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[:, 3:], packed[:, 3:], atol=1e-4)  # without masking they differ


@pytest.mark.parametrize(
    "meta,message",
    [
        ('-- set ns.trainer_type = "pipeline"\n', "document_masking is not supported by the pipeline trainer"),
        ('-- set ns.trainer_type = "basic"\n-- set ns.loss_impl = "chunked"\n',
         "the chunked loss kernel does not support document_masking"),
    ],
)
def test_document_masking_rules(tmp_path, meta, message):
    path = small_config(tmp_path, meta + "-- set ns.document_masking = true\n")
    proc = run_fgc("check", path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.slow
def test_document_masking_trains_on_two_ranks(tmp_path):
    masked, plain = tmp_path / "masked", tmp_path / "plain"
    knobs = ["-D", "max_steps=3", "-D", "eval_every=3", "-D", "num_hidden_layers=2"]
    run_fgc("build", EXAMPLE, "-o", masked, *knobs, "-D", "document_masking=true", check=True)
    run_fgc("build", EXAMPLE, "-o", plain, *knobs, check=True)
    assert "DocumentMasking(model" in (masked / "train.py").read_text()
    losses = {}
    for name, out in (("masked", masked), ("plain", plain)):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(out / "train.py"),
             "--output-dir", str(tmp_path / f"run_{name}"), "--log-every", "1"],
            capture_output=True, text=True, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = (tmp_path / f"run_{name}" / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(r)["loss"] for r in records if '"loss"' in r]
    assert len(losses["masked"]) == 3
    # the corpus's documents are shorter than a window: masking changes what each token sees
    assert losses["masked"][0] != pytest.approx(losses["plain"][0], rel=1e-5)
