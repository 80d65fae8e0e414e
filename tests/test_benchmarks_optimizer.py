"""benchmarks/optimizer.py: every optimizer step it names is timed, against torch's fused step."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "optimizer.py"


@pytest.mark.slow  # compiles fgc's fused AdamW step (the fallback of its CPU kernel)
def test_every_step_is_timed_against_torchs_fused_step(tmp_path):
    out_csv = tmp_path / "optimizer.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "example", "--steps", "2", "--rounds", "2", "--csv", str(out_csv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "baseline: torch AdamW, fused (fp32)" in proc.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["weights"]) for r in rows] == [
        ("torch AdamW, fused", "fp32"),
        ("torch AdamW, foreach", "fp32"),
        ("fgc AdamW, fused", "fp32"),
        ("fgc AdamW, fused, bf16 to nearest", "bf16"),
        ("fgc AdamW, fused, stochastic rounding", "bf16"),
        ("fgc AdamW, fused, stochastic rounding, torch.compile's kernel", "bf16"),
        ("fgc AdamW, stochastic rounding", "bf16"),
    ]
    # the parameters of transformers' Llama of the example's shape: 3 layers of 9, the embedding,
    # the final norm and the head
    assert {(r["shape"], r["tensors"], r["values"]) for r in rows} == {("example", "30", "354144")}
    assert rows[0]["vs_torch_fused"] == "1.00"
    for row in rows:
        assert float(row["ms"]) > 0
        assert float(row["vs_torch_fused"]) > 0


def test_bad_arguments_are_refused():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "example", "--rounds", "0"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--steps and --rounds must be at least 1" in proc.stderr
