"""benchmarks/attention.py: every loop is measured, and each is causal attention to bf16 rounding."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "attention.py"


def test_every_loop_is_measured_and_matches_fp64_attention(tmp_path):
    out_csv = tmp_path / "attention.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--chunk", "16", "--reps", "1", "--rounds", "1", "--csv", str(out_csv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "16 queries per chunk" in proc.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["loop"] for r in rows] == [
        "sdpa, fp32",
        "sdpa, bf16",
        "sdpa, fp32, compile",
        "by query chunks, compile",
        "by query chunks, compile, recomputed",
    ]
    assert rows[0]["vs_fp32"] == "1.00"
    for row in rows:
        assert row["dims"] == "B1 H4 K2 T40 E8"
        assert float(row["ms"]) > 0
        # bf16 inputs: within a few bf16 roundings (0.4% each) of fp64 attention, output and gradients
        assert float(row["max_err"]) <= 2e-2, row
        assert any(line.split()[:1] == ["tiny"] and row["loop"] in line for line in proc.stdout.splitlines())
    # what the forward keeps for the backward: at T 40 (under 512) the chunks' probabilities; recomputed, less
    # than the baseline, which keeps fp32 copies of q, k and v
    kept = {r["loop"]: float(r["kept_mib"]) for r in rows}
    assert 0 < kept["by query chunks, compile, recomputed"] < kept["by query chunks, compile"]
    assert kept["by query chunks, compile, recomputed"] < kept["sdpa, fp32"]


def test_an_unknown_shape_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "h512"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown shape 'h512': the shapes are example, h256, t1024, t2048, tiny" in proc.stderr
