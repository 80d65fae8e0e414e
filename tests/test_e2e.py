"""End to end: fgc build the main example, then train with torchrun on 2 gloo ranks (CPU)."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc

pytestmark = pytest.mark.slow


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_then_torchrun_two_ranks_trains(tmp_path):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "max_steps=60", "-D", "eval_every=30", check=True)
    proc = torchrun(out / "train.py", "--output-dir", tmp_path / "run", "--log-every", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1] + list(range(5, 61, 5))  # step 1: the starting loss
    assert [r["step"] for r in evals] == [30, 60]
    for r in train:
        assert list(r) == [
            "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "peak_mem_bytes", "elapsed_s", "eta_s"
        ]
    # 16 sequences of 128 tokens per step, counted over both ranks
    assert train[-1]["tokens"] == 60 * 16 * 128
    # the loss falls clearly: from about ln(257) = 5.55 to well below it
    assert train[0]["loss"] > 4.5
    assert train[-1]["loss"] < train[0]["loss"] - 1.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000060"
    assert (ckpt / "step-00000060" / "manifest.json").is_file()
    assert (ckpt / "step-00000060" / "rng-rank1.pt").is_file()


def test_ddp_and_single_process_agree(tmp_path):
    """The global batch is the same whatever the world size, and the loss is normalised by the
    global target count, so 2 ranks and 1 process take the same steps (up to float reduction order)."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "max_steps=6", "-D", "eval_every=0", check=True)
    two = torchrun(out / "train.py", "--output-dir", tmp_path / "two", "--log-every", "1", cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp_path / "one"), "--log-every", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    loss_two = [r["loss"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    loss_one = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    assert len(loss_one) == len(loss_two) == 6
    assert loss_one == pytest.approx(loss_two, rel=1e-4)


def test_resume_continues_exactly(tmp_path):
    """On CPU, stopping and resuming from a checkpoint gives bitwise the losses of one run."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", "-D", "max_steps=8", check=True)

    def train(output, *flags):
        proc = subprocess.run(
            [sys.executable, str(out / "train.py"), "--output-dir", str(output), "--log-every", "1", *flags],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    train(tmp_path / "full")
    train(tmp_path / "part", "--max-steps", "4")
    resumed = train(tmp_path / "part")
    assert "resuming from" in resumed.stdout and "step-00000004" in resumed.stdout
    full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    part = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert len(full) == 8
    assert part == full  # metrics.jsonl appends: steps 1-4, then 5-8 after the resume


def test_trainer_errors_are_one_line_exit_2(tmp_path):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", check=True)
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--data", str(tmp_path / "no_such_dir")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no_such_dir" in proc.stderr and "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, str(out / "train.py"), "--resume", str(tmp_path / "nope")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no such checkpoint" in missing.stderr


def test_debug_optimizer_groups(tmp_path):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", check=True)
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--debug-optimizer-groups", "--output-dir", str(tmp_path / "o")],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    groups = {line.split("  ")[0]: line.split("  ")[2] for line in proc.stdout.splitlines()}
    assert groups["model.embed_tokens.weight"] == "group=no_decay"
    assert groups["model.layers.0.input_layernorm.weight"] == "group=no_decay"
    assert groups["model.layers.0.mlp.up_proj.weight"] == "group=decay"
    assert not (tmp_path / "o").exists()  # it prints and exits before anything is written


def test_dry_run(tmp_path):
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "trainer_type=basic", check=True)
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--dry-run", "--output-dir", str(tmp_path / "o")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    # the plan as a table, one setting a line
    assert "plan:\n  trainer_type              basic\n" in proc.stdout
    assert re.search(r"^  mesh +none$", proc.stdout, re.M) and "{'" not in proc.stdout
    assert "is writable" in proc.stdout
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_ddp_resume_continues_exactly_and_under_another_world_size(tmp_path):
    """2-rank DDP stopped and resumed gives bitwise the uninterrupted losses; resuming the same
    checkpoint in one process continues the same global batches (the data order is defined by
    the global sample index), so its losses match up to float reduction order."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "max_steps=6", "-D", "eval_every=0", check=True)
    full = torchrun(out / "train.py", "--output-dir", tmp_path / "full", "--log-every", "1", cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    part = torchrun(out / "train.py", "--output-dir", tmp_path / "part", "--log-every", "1", "--max-steps", "3", cwd=tmp_path)
    assert part.returncode == 0, part.stderr[-3000:]
    shutil.copytree(tmp_path / "part", tmp_path / "single")
    resumed = torchrun(out / "train.py", "--output-dir", tmp_path / "part", "--log-every", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    loss_full = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    loss_part = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl")]
    assert len(loss_full) == 6 and loss_part == loss_full
    single = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp_path / "single"), "--log-every", "1"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    loss_single = [r["loss"] for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    assert loss_single[:3] == loss_full[:3]
    assert loss_single[3:] == pytest.approx(loss_full[3:], rel=1e-4)


def _losses(out: Path, tmp_path: Path, name: str, *flags: str) -> list[float]:
    proc = subprocess.run(
        [sys.executable, str(out / "train.py"), "--output-dir", str(tmp_path / name), "--log-every", "1", *flags],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]


def test_activation_checkpointing_and_compile_keep_the_losses(tmp_path):
    """Recomputing activations gives bitwise the same steps; compiling each layer the same up to
    float rounding. The plan records the order they are applied in."""
    common = ["-D", "trainer_type=basic", "-D", "max_steps=3", "-D", "eval_every=0"]
    plain, ac, both = tmp_path / "plain", tmp_path / "ac", tmp_path / "both"
    run_fgc("build", EXAMPLE, "-o", plain, *common, check=True)
    run_fgc("build", EXAMPLE, "-o", ac, *common, "-D", "activation_checkpointing=full", check=True)
    run_fgc("build", EXAMPLE, "-o", both, *common, "-D", "activation_checkpointing=full", "-D", "compile=true", check=True)
    manifest = json.loads((both / "manifest.json").read_text())
    assert manifest["plan"]["apply_order"] == ["activation checkpointing", "compile"]
    assert "apply_compile" not in (ac / "train.py").read_text()
    reference = _losses(plain, tmp_path, "run_plain")
    assert _losses(ac, tmp_path, "run_ac") == reference
    assert _losses(both, tmp_path, "run_both") == pytest.approx(reference, rel=1e-4)


def test_compiled_bf16_mixed_attends_by_query_chunks_with_the_eager_losses(tmp_path):
    """In bf16-mixed, each compiled layer attends by query chunks in bf16 on the CPU, and eager
    layers with fp32 flash attention (fgc_runtime.kernels.attention; tests/runtime/test_kernels.py
    checks which path each takes). Six steps give the same losses to 5e-4, with activation
    checkpointing too (its recomputed forward attends by chunks as well)."""
    common = ["-D", "trainer_type=basic", "-D", "max_steps=6", "-D", "eval_every=0", "-D", "precision=bf16-mixed"]
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_fgc("build", EXAMPLE, "-o", eager, *common, check=True)
    run_fgc("build", EXAMPLE, "-o", compiled, *common, "-D", "compile=true", "-D", "activation_checkpointing=full", check=True)
    reference = _losses(eager, tmp_path, "run_eager")
    assert len(reference) == 6
    assert _losses(compiled, tmp_path, "run_compiled") == pytest.approx(reference, rel=5e-4)


def test_fsdp2_matches_ddp_and_resumes_exactly(tmp_path):
    """FSDP2 on 2 gloo ranks, with 2 micro-batches a step: the same losses as DDP (up to float
    reduction order), and stopping and resuming (full gathered checkpoints) is bitwise exact."""
    knobs = ["-D", "max_steps=4", "-D", "eval_every=0", "-D", "micro_batch_size=4"]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    run_fgc("build", EXAMPLE, "-o", fsdp, "-D", "trainer_type=fsdp2", *knobs, check=True)
    run_fgc("build", EXAMPLE, "-o", ddp, *knobs, check=True)
    assert json.loads((fsdp / "manifest.json").read_text())["plan"]["fsdp_units"] == "each decoder layer, then the root"
    runs = {}
    for name, package, flags in [
        ("ddp", ddp, []),
        ("fsdp", fsdp, []),
        ("part", fsdp, ["--max-steps", "2"]),
        ("part", fsdp, []),  # resumes from step 2
    ]:
        proc = torchrun(package / "train.py", "--output-dir", tmp_path / name, "--log-every", "1", *flags, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert len(runs["fsdp"]) == 4
    assert runs["fsdp"] == pytest.approx(runs["ddp"], rel=1e-4)
    assert runs["part"] == runs["fsdp"]
