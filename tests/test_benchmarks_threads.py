"""benchmarks/threads.py: every thread setting it names runs the main example, against one thread."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO
from fgc_runtime.threads import usable_cores

SCRIPT = REPO / "benchmarks" / "threads.py"


@pytest.mark.slow  # five training runs, three of them torchrun jobs
def test_every_thread_setting_is_timed_against_one_thread(tmp_path):
    out_csv = tmp_path / "threads.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--rounds", "1", "--csv", str(out_csv)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = usable_cores()
    assert proc.stdout.startswith(f"{cores} cores this process may use")
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["row"], r["processes"]) for r in rows] == [
        ("1 process, --cpu-threads 1", "1"),
        ("1 process", "1"),
        ("2 processes, --cpu-threads 1", "2"),
        ("2 processes", "2"),
        (f"2 processes, --cpu-threads {cores}", "2"),
    ]
    assert [r["threads_each"] for r in rows[2:]] == ["1", str(max(1, cores // 2)), str(cores)]
    # the baselines are their own rows
    assert rows[0]["vs_one_thread"] == rows[2]["vs_one_thread"] == "1.00"
    for row in rows:
        assert float(row["tokens_per_s"]) > 0
        assert float(row["vs_one_thread"]) > 0


def test_bad_arguments_are_refused():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "--steps and --rounds must be at least 1" in proc.stderr
