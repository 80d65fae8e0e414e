"""The GPU check (scripts/gpu_check.sh, benchmarks/gpu_train.py) on the CPU: its two halves work
where they can be run here, and it refuses what it cannot do."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from conftest import REPO

GPU_TRAIN = REPO / "benchmarks" / "gpu_train.py"


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*map(str, args)], cwd=REPO, capture_output=True, text=True, **kwargs)


@pytest.mark.slow  # about 40 s: builds a package and trains it and the transformers loop
def test_prepare_then_run_on_the_cpu_gives_a_row_per_loop(tmp_path):
    packages = tmp_path / "packages"
    proc = run(sys.executable, GPU_TRAIN, "prepare", packages, "--shape", "tiny", "--variants", "fgc")
    assert proc.returncode == 0, proc.stderr
    assert (packages / "fgc" / "train.py").is_file()
    # the packages need only torch: fgc_runtime is vendored in each
    assert (packages / "fgc" / "fgc_runtime" / "train.py").is_file()

    out_csv = tmp_path / "train.csv"
    proc = run(sys.executable, GPU_TRAIN, "run", packages, "--device", "cpu", "--steps", "2", "--csv", out_csv)
    assert proc.returncode == 0, proc.stderr
    with open(out_csv, newline="") as f:
        rows = {row["loop"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"fgc", "HF Llama, autocast bf16"}
    assert float(rows["HF Llama, autocast bf16"]["vs_hf"]) == 1.0
    assert int(rows["fgc"]["tokens_per_s"]) > 0
    assert 0 < float(rows["fgc"]["loss"]) < 10  # a real loss: the byte vocabulary starts near ln 257
    assert rows["fgc"]["mfu"] == "-"  # no datasheet peak for a CPU
    assert "354,144 parameters" in proc.stdout  # the tiny shape: the main example's defaults


def test_run_without_a_gpu_is_refused(tmp_path):
    (tmp_path / "benchmark.json").write_text('{"shape": "tiny", "variants": []}')
    proc = run(sys.executable, GPU_TRAIN, "run", tmp_path)
    assert proc.returncode == 2
    assert "error: no CUDA GPU (use --device cpu to check the script)" in proc.stderr


def test_unknown_variant_is_a_usage_error(tmp_path):
    proc = run(sys.executable, GPU_TRAIN, "prepare", tmp_path, "--variants", "fgc,fast")
    assert proc.returncode == 2
    assert "--variants: unknown 'fast'" in proc.stderr


def test_gpu_check_without_a_command_prints_its_usage():
    proc = run("bash", REPO / "scripts" / "gpu_check.sh")
    assert proc.returncode == 2
    assert proc.stderr == "usage: gpu_check.sh prepare | run OUT\n"
