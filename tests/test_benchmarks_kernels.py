"""benchmarks/kernels.py: its CPU check mode (Triton's interpreter) and its refusal without a GPU."""

from __future__ import annotations

import csv
import itertools
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "kernels.py"
# Tiny shapes with values of a few units: bf16 rows may differ from the twin by about one ulp there
# (the twin rounds more often), fp32 rows by float32 rounding only.
TOLERANCE = {"bf16": 0.07, "fp32": 1e-5}


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the script without the suite's TRITON_INTERPRET=1, so the script alone decides it."""
    full_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True)


@pytest.mark.slow  # about 45 s: each row torch.compiles the twin on the CPU
def test_interpret_runs_every_row_and_triton_matches_the_twins(tmp_path):
    out_csv = tmp_path / "kernels.csv"
    proc = run_script("--interpret", "--csv", str(out_csv))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("INTERPRETER RUN (TRITON_INTERPRET=1") and "meaningless" in lines[0]
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))

    expected = set(itertools.product(["rms_norm", "swiglu", "rope", "cross_entropy"], ["bf16", "fp32"], ["fwd", "fwd+bwd"]))
    assert sorted((r["kernel"], r["dtype"], r["pass"]) for r in rows) == sorted(expected)
    printed = [line.split() for line in lines]
    for row in rows:
        assert " ".join(row.values()).split() in printed, f"row not printed: {row}"
        for column in ("torch_ms", "compile_ms", "triton_ms"):
            assert float(row[column]) > 0
        assert row["check"] == "ok", row
        diff = float(row["max_abs_diff"])
        assert 0 <= diff < TOLERANCE[row["dtype"]], row
    # No peak-bandwidth column off CUDA.
    assert "peak_bw" not in rows[0]


def test_without_a_gpu_it_exits_2_with_one_line():
    proc = run_script(CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "error: benchmarks/kernels.py needs a CUDA GPU and torch sees none "
        "(--interpret checks it on the CPU in Triton's interpreter, with meaningless timings)"
    ]


def test_an_unknown_kernel_is_a_usage_error():
    proc = run_script("--interpret", "--kernels", "rms_norm,softmax")
    assert proc.returncode == 2
    assert "--kernels: unknown 'softmax': expected one of rms_norm, swiglu, rope, cross_entropy" in proc.stderr
    assert "Traceback" not in proc.stderr
