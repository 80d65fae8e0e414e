"""benchmarks/rope.py: both backwards of the bf16 rotation train the same, and the script measures each."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "rope.py"


@pytest.mark.slow  # builds the example and compiles its trainer twice, in two processes
def test_both_backwards_are_measured_and_train_alike(tmp_path):
    out_csv = tmp_path / "rope.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "tiny", "--steps", "2", "--rounds", "1", "--csv", str(out_csv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "bf16-mixed, compile, fused AdamW" in proc.stdout
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["shape"], r["backward"]) for r in rows] == [("tiny", "autograd's"), ("tiny", "written out")]
    assert rows[0]["vs_autograd"] == "1.00"
    for row in rows:
        assert int(row["tokens_per_s"]) > 0
        assert float(row["rotation_kernels_ms"]) > 0  # the rotation's compiled kernels were found
        assert float(row["compiled_kernels_ms"]) >= float(row["rotation_kernels_ms"])
    # autograd derives the rotation's backward through zero-padded halves; written out, it has none
    assert int(rows[0]["slice_backward_kernels"]) > 0 and rows[1]["slice_backward_kernels"] == "0"
    # four steps of the same batches: the losses agree to bf16 rounding
    assert abs(float(rows[0]["last_loss"]) - float(rows[1]["last_loss"])) <= 2e-2 * float(rows[0]["last_loss"])


def test_an_unknown_shape_is_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "h512"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown shape 'h512': the shapes are example, h256, tiny" in proc.stderr
