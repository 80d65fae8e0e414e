"""benchmarks/bf16_curve.py: its verdict on synthetic curves, and a short run of the script."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO, load_benchmark

SCRIPT = REPO / "benchmarks" / "bf16_curve.py"


@pytest.fixture(scope="module")
def curve():
    return load_benchmark("bf16_curve")


def _runs(base: float, offset: float) -> list[list[float]]:
    """Three seeds' curves of 4 steps: the seeds spread the loss by about 0.1."""
    return [[base - 0.1 * step + offset + 0.1 * seed for step in range(4)] for seed in (-1, 0, 1)]


def test_a_curve_inside_the_seed_noise_is_met_and_one_outside_is_not(curve):
    near = {"bf16-mixed": _runs(5.0, 0.0), "bf16": _runs(5.0, 0.05)}
    line = curve.verdict("example", near, 2)
    # last 2 steps: difference 0.05; each precision's seed std 0.1, so the standard error is
    # sqrt(2 * 0.01 / 3) = 0.0816
    assert line == (
        "example: last 2 steps, bf16 - bf16-mixed = +0.0500, standard error 0.0816 over 3 seeds "
        "(goal: within 2 standard errors) -> met"
    )
    far = {"bf16-mixed": _runs(5.0, 0.0), "bf16": _runs(5.0, 0.5)}
    assert curve.verdict("example", far, 2).endswith("-> NOT met")
    rows = curve.curve_rows("example", near, 2)
    assert [r["steps"] for r in rows] == ["1-2", "3-4"]
    assert rows[0]["bf16-mixed"] == "4.9500" and rows[0]["bf16"] == "5.0000"
    assert rows[0]["bf16 - mixed"] == "+0.0500" and rows[0]["seed std (mixed)"] == "0.1000"
    # one seed has no noise estimate: said, not judged
    one = {p: runs[:1] for p, runs in near.items()}
    assert "no noise estimate" in curve.verdict("example", one, 2)


@pytest.mark.slow  # about 20 s: two builds and four short runs
def test_the_script_trains_both_precisions_from_each_seed(tmp_path):
    out_csv = tmp_path / "curve.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "4", "--seeds", "2", "--window", "2", "--threads", "1", "--csv", str(out_csv)],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss over 4 steps, mean over 2 seed(s) per precision, windows of 2 steps; 1 thread(s)" in proc.stdout
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["steps"] for r in rows] == ["1-2", "3-4"]
    for r in rows:
        mixed, bf16 = float(r["bf16-mixed"]), float(r["bf16"])
        # the same seeds, the same data: the two precisions start from the same loss to bf16 rounding
        assert 3.0 < mixed < 7.0 and abs(bf16 - mixed) < 0.05
        assert float(r["seed std (mixed)"]) > 0  # two seeds: two different runs
    assert proc.stdout.strip().splitlines()[-1].startswith("example: last 2 steps, bf16 - bf16-mixed = ")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--shapes", "h512"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown shape 'h512'" in bad.stderr
