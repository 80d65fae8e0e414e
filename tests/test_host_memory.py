"""fgc_runtime.host_memory: freed host memory kept in the process (glibc's malloc options), what the
generated trainer does on a CPU device unless the config says keep_host_memory: false."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fgc_runtime import host_memory

# A fresh process runs 20 training steps of a small MLP (16 MiB activations, freed at each step's
# end), with or without keep_freed_memory() first, and prints the median of the minor page faults
# of its last 10 steps (the median: the system may fault in a page of kept memory now and then).
FAULTS = """
import resource, statistics, sys, torch
from fgc_runtime import host_memory
if sys.argv[1] == "keep":
    print(host_memory.keep_freed_memory())
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randn(4096, 256)
faults = []
for step in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults[10:])))
"""
GLIBC = host_memory.glibc() is not None


def _faults(mode: str, env: dict | None = None) -> tuple[list[str], int]:
    run = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    *lines, faults = run.stdout.splitlines()
    return lines, int(faults)


@pytest.mark.skipif(not GLIBC, reason="keeps memory with glibc's malloc only")
def test_kept_memory_is_not_faulted_in_again():
    """By default glibc hands freed activations back, and steps fault their pages in again (4 KiB
    each, thousands a step); kept, the steps after the first few fault none."""
    lines, faults = _faults("keep")
    assert lines == ["host memory: freed memory kept for the next step (glibc malloc: heap up to 32 MiB, no trimming)"]
    assert faults < 50
    _, default_faults = _faults("default")
    assert default_faults > 1000


@pytest.mark.skipif(not GLIBC, reason="keeps memory with glibc's malloc only")
def test_malloc_options_of_the_environment_are_left_as_they_are():
    """A user who set glibc's malloc options in the environment keeps them: nothing is changed
    (here the user's own options map every block anew, and so the loop still faults)."""
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    lines, faults = _faults("keep", env)
    assert lines == ["host memory: malloc as the environment sets it (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_)"]
    assert faults > 1000


def test_the_environment_variables_that_set_malloc_options():
    assert host_memory.malloc_environment({"MALLOC_ARENA_MAX": "2", "PATH": "/bin"}) == ["MALLOC_ARENA_MAX"]
    assert host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}) == ["GLIBC_TUNABLES"]
    # tunables of something else than malloc choose nothing about it
    assert host_memory.malloc_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}) == []
    assert host_memory.keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1"}) == (
        "host memory: malloc as the environment sets it (GLIBC_TUNABLES)"
    )


def test_a_malloc_other_than_glibcs_is_left_as_it_is(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.glibc() is None
    assert host_memory.keep_freed_memory({}) == "host memory: malloc is not glibc's, left as it is"


KEPT = "host memory: freed memory kept for the next step (glibc malloc: heap up to 32 MiB, no trimming)"


@pytest.mark.skipif(not GLIBC, reason="keeps memory with glibc's malloc only")
def test_the_generated_trainer_keeps_host_memory_on_the_cpu_unless_the_config_says_not(tmp_path):
    """On a CPU device train.py keeps freed memory and says so; `-D keep_host_memory=false`
    changes the one constant (and the config's hash), and the run leaves malloc as it is."""
    from conftest import run_fgc, small_config

    config = small_config(tmp_path)
    outputs = {}
    for keep in ("true", "false"):
        build = tmp_path / f"build_{keep}"
        run_fgc("build", config, "-o", build, "-D", f"keep_host_memory={keep}", check=True)
        run = subprocess.run(
            [sys.executable, build / "train.py", "--dry-run", "--device", "cpu", "--output-dir", tmp_path / f"out_{keep}"],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[keep] = (run.stdout.splitlines(), (build / "train.py").read_text().splitlines())
    (kept_out, kept_py), (default_out, default_py) = outputs["true"], outputs["false"]
    # the dry run prints the line after the plan, before its loss
    assert kept_out[kept_out.index(KEPT) + 1].startswith("dry run: loss")
    assert not any(line.startswith("host memory") for line in default_out)
    assert [line for line in kept_out if line != KEPT] == [
        line.replace(str(tmp_path / "out_false"), str(tmp_path / "out_true")) for line in default_out
    ]
    changed = [(a, b) for a, b in zip(kept_py, default_py) if a != b]
    assert len(kept_py) == len(default_py)
    # the constant, and the hash of the rendered config
    assert [a.split(" = ")[0] for a, _ in changed] == ["KEEP_HOST_MEMORY", "CONFIG_HASH"]
    assert changed[:1] == [
        (
            "KEEP_HOST_MEMORY = True  # -D keep_host_memory=True (<fgc>/lm/train.yaml:77)",
            "KEEP_HOST_MEMORY = False  # -D keep_host_memory=False (<fgc>/lm/train.yaml:77)",
        )
    ]
