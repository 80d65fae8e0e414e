"""benchmarks/fused_projections.py: every row is measured, and fusing changes no output value."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "fused_projections.py"


def test_every_group_and_precision_is_measured_and_the_outputs_agree(tmp_path):
    out_csv = tmp_path / "fused.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--shapes", "example", "--reps", "1", "--rounds", "1", "--csv", str(out_csv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["projections"], r["precision"]) for r in rows) == sorted(
        (g, p) for g in ("q,k,v", "gate,up") for p in ("fp32", "bf16-mixed")
    )
    for row in rows:
        assert float(row["separate_ms"]) > 0 and float(row["fused_ms"]) > 0
        # the fused weight is the separate weights stacked: the same products, summed alike
        assert float(row["max_abs_diff"]) <= 1e-2, row
        # the printed table has the row
        assert any(line.split()[:3] == ["example", row["projections"], row["precision"]] for line in proc.stdout.splitlines())
