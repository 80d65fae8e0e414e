"""End to end, one process: TensorBoard files, text samples, the MFU line, and an exact resume
with the Muon optimizer and a warmup-stable-decay schedule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc

pytestmark = pytest.mark.slow

# one process, 4 sequences of 64 tokens a step: quick
SMALL = ("-D", "trainer_type=basic", "-D", "batch_size=4", "-D", "seq_len=64")


def train(package: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(package / "train.py"), "--output-dir", str(output), *flags],
        cwd=output.parent,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_samples_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, *SMALL, "-D", "max_steps=6",
            "-D", "sample_every=3", "-D", "sample_prompt=The bird", check=True)
    proc = train(out, tmp_path / "run", "--log-every", "2")
    lines = proc.stdout.splitlines()
    # the FLOPs formula once at start; on CPU MFU is null, never a guess
    assert lines[0].startswith("FLOPs/token = 6*N + 12*L*H*T = ")
    assert lines[0].endswith("MFU: unknown device cpu (fp32), reported as null")
    # plain lines (stdout is not a terminal): no bar, no carriage returns
    assert "\r" not in proc.stdout
    # step 1 (the starting loss), then every LOG_EVERY steps
    assert [line.split(" | ")[0] for line in lines if line.startswith("step ")] == ["step 1", "step 2", "step 4", "step 6"]

    records = jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert all(r["mfu"] is None and r["peak_mem_bytes"] > 0 for r in records)
    assert records[-1]["eta_s"] == 0.0 and records[0]["eta_s"] > 0

    samples = jsonl(tmp_path / "run" / "samples.jsonl")
    assert [(s["step"], s["prompt"]) for s in samples] == [(3, "The bird"), (6, "The bird")]
    assert all(isinstance(s["text"], str) and len(s["text"]) <= 64 for s in samples)
    assert f"sample at step 3: {('The bird' + samples[0]['text'])!r}" in lines

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def test_muon_with_wsd_resumes_exactly(tmp_path):
    """On CPU, a Muon run stopped at step 3 and resumed takes bitwise the steps of one run, and
    its greedy samples are the same."""
    out = tmp_path / "build"
    run_fgc("build", EXAMPLE, "-o", out, *SMALL, "-D", "max_steps=6",
            "-D", "optimizer=muon", "-D", "lr_scheduler=wsd", "-D", "warmup_steps=2",
            "-D", "sample_every=2", check=True)
    groups = subprocess.run(
        [sys.executable, str(out / "train.py"), "--debug-optimizer-groups"],
        cwd=tmp_path, capture_output=True, text=True,
    ).stdout
    assert "model.layers.0.mlp.up_proj.weight  (256, 96)  group=muon/decay" in groups
    assert "lm_head.weight  (257, 96)  group=adamw/decay" in groups

    train(out, tmp_path / "full", "--log-every", "1")
    train(out, tmp_path / "part", "--log-every", "1", "--max-steps", "3")
    resumed = train(out, tmp_path / "part", "--log-every", "1")
    assert "resuming from" in resumed.stdout and "step-00000003" in resumed.stdout
    full = jsonl(tmp_path / "full" / "metrics.jsonl")
    part = jsonl(tmp_path / "part" / "metrics.jsonl")
    assert len(full) == 6
    assert [r["loss"] for r in part] == [r["loss"] for r in full]
    assert [r["lr"] for r in part] == [r["lr"] for r in full]
    assert full[0]["loss"] - full[-1]["loss"] > 0.3  # it trains
    assert jsonl(tmp_path / "part" / "samples.jsonl") == jsonl(tmp_path / "full" / "samples.jsonl")
