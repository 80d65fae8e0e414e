"""Killed, stopped and failing trainers (CPU, gloo): a run SIGKILLed at any moment and resumed
gives bitwise the losses of an uninterrupted run; SIGTERM on one rank stops every rank at the same
step with a checkpoint and exit status 0; `train.py --control` reaches a running job; an exception
on one rank brings the job down.

Failures are injected by small wrapper scripts that import the generated package, patch one of
its runtime functions and run train.py: the generated code has no test hooks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1")
# a safety net against a hung trainer; no assertion is made on time
SAFETY_TIMEOUT_S = 900


def python(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=ENV,
        timeout=SAFETY_TIMEOUT_S,
    )


def torchrun_cmd(*args, nproc=2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *map(str, args)]


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_cmd(*args), cwd=cwd, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S
    )


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run: Path) -> dict[int, list[float]]:
    """Every logged loss of each step (a resumed run removes the records after its checkpoint,
    so a step run again is still logged once)."""
    out: dict[int, list[float]] = {}
    for r in read_metrics(run):
        if "loss" in r:
            out.setdefault(r["step"], []).append(r["loss"])
    return out


def assert_same_losses(run: Path, full: dict[int, float]) -> None:
    """Every step of the full run is logged once, in order, with bitwise the full run's loss."""
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == sorted(full)
    got = losses_by_step(run)
    for step, values in got.items():
        assert values == [full[step]], f"step {step}: {values} != {full[step]}"


def wrapper(tmp_path: Path, name: str, patch: str) -> Path:
    """A script `WRAPPER BUILD_DIR TRAIN_ARGS...` that runs BUILD_DIR/train.py after PATCH."""
    path = tmp_path / f"{name}.py"
    path.write_text(
        "import os, runpy, signal, sys\n"
        "build = sys.argv[1]\n"
        "sys.path.insert(0, build)\n"
        "RANK = int(os.environ.get('RANK', '0'))\n"
        f"{patch}\n"
        "sys.argv = [os.path.join(build, 'train.py')] + sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    return path


def kill_on_save_call(n: int, rank: int) -> str:
    """Patch: on RANK, the Nth checkpoint file write leaves half a file and SIGKILLs the process."""
    return (
        "import fgc_runtime.checkpoint as ck\n"
        "original, calls = ck._save, [0]\n"
        "def _save(obj, path):\n"
        f"    if RANK == {rank}:\n"
        "        calls[0] += 1\n"
        f"        if calls[0] == {n}:\n"
        "            path.write_bytes(b'half a file')\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "    original(obj, path)\n"
        "ck._save = _save\n"
    )


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def read_control(run: Path) -> dict:
    return json.loads((run / "control.json").read_text())


class Packages:
    """The packages under test, built once, and their uninterrupted runs, made when first needed."""

    def __init__(self, root: Path):
        self.root = root
        self.basic = root / "basic"
        self.ddp = root / "ddp"
        run_fgc("build", EXAMPLE, "-o", self.basic, "-D", "trainer_type=basic", "-D", "max_steps=16",
                "-D", "eval_every=0", check=True)
        run_fgc("build", EXAMPLE, "-o", self.ddp, "-D", "max_steps=8", "-D", "eval_every=4", check=True)

    @cached_property
    def basic_full(self) -> dict[int, float]:
        proc = python(self.basic / "train.py", "--output-dir", self.root / "basic-full", "--log-every", "1",
                      cwd=self.root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {s: v[0] for s, v in losses_by_step(self.root / "basic-full").items()}

    @cached_property
    def ddp_full(self) -> dict[int, float]:
        proc = torchrun(self.ddp / "train.py", "--output-dir", self.root / "ddp-full", "--log-every", "1",
                        cwd=self.root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {s: v[0] for s, v in losses_by_step(self.root / "ddp-full").items()}


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory) -> Packages:
    return Packages(tmp_path_factory.mktemp("packages"))


def kill_after_step(cmd: list[str], step: int, cwd: Path) -> int:
    """Run CMD, SIGKILL it once it prints `step STEP |`; its exit status."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith(f"step {step} |"):
            proc.kill()
            break
    proc.stdout.read()
    return proc.wait(timeout=SAFETY_TIMEOUT_S)


def test_basic_killed_mid_training_resumes_bitwise(pkgs, tmp_path):
    run = tmp_path / "run"
    status = kill_after_step(
        [sys.executable, str(pkgs.basic / "train.py"), "--output-dir", str(run), "--log-every", "1",
         "--save-every", "3"],
        step=5, cwd=tmp_path,
    )
    assert status == -signal.SIGKILL  # killed before the end of its 16 steps, after the save of step 3
    assert max(losses_by_step(run)) == 5
    resumed = python(pkgs.basic / "train.py", "--output-dir", run, "--log-every", "1", "--save-every", "3",
                     cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-00000003 at step 3" in resumed.stdout
    # steps 4 and 5 ran before the kill and run again after the resume
    assert "metrics.jsonl: removed 2 records after step 3, to be logged again" in resumed.stdout
    assert_same_losses(run, pkgs.basic_full)


def test_basic_killed_mid_save_ignores_and_cleans_the_partial_checkpoint(pkgs, tmp_path):
    run = tmp_path / "run"
    # 4 files a save (model, optimizer, trainer state, rng): the 6th write is the optimizer of step 6
    killer = wrapper(tmp_path, "killer", kill_on_save_call(6, rank=0))
    killed = python(killer, pkgs.basic, "--output-dir", run, "--log-every", "1", "--save-every", "3", cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL
    assert checkpoints(run) == [".tmp-step-00000006", "latest", "step-00000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    resumed = python(pkgs.basic / "train.py", "--output-dir", run, "--log-every", "1", "--save-every", "3",
                     cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-00000003 at step 3" in resumed.stdout
    assert not [name for name in checkpoints(run) if name.startswith(".tmp")]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000016"
    assert_same_losses(run, pkgs.basic_full)


def test_ddp_killed_mid_training_resumes_bitwise(pkgs, tmp_path):
    run = tmp_path / "run"
    # rank 1 is SIGKILLed as it fetches the batch of step 6, after the checkpoint of step 4
    patch = (
        "import fgc_runtime.data as data\n"
        "original = data.BatchSampler.batch\n"
        "def batch(self, index):\n"
        "    if RANK == 1 and index == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, index)\n"
        "data.BatchSampler.batch = batch\n"
    )
    killer = wrapper(tmp_path, "killer", patch)
    killed = subprocess.run(
        torchrun_cmd(killer, pkgs.ddp, "--output-dir", run, "--log-every", "1", "--save-every", "2"),
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S,
    )
    assert killed.returncode != 0  # rank 1 was killed: torchrun reports the failure
    assert max(losses_by_step(run)) == 5
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    resumed = torchrun(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--save-every", "2",
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_losses(run, pkgs.ddp_full)


def test_ddp_killed_mid_save_resumes_bitwise(pkgs, tmp_path):
    run = tmp_path / "run"
    # rank 0 writes 4 files a save: the 5th is the model of the save at step 6
    killer = wrapper(tmp_path, "killer", kill_on_save_call(5, rank=0))
    killed = subprocess.run(
        torchrun_cmd(killer, pkgs.ddp, "--output-dir", run, "--log-every", "1", "--save-every", "3"),
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S,
    )
    assert killed.returncode != 0
    assert checkpoints(run) == [".tmp-step-00000006", "latest", "step-00000003"]
    resumed = torchrun(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--save-every", "3",
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000003 at step 3" in resumed.stdout
    assert not [name for name in checkpoints(run) if name.startswith(".tmp")]
    assert_same_losses(run, pkgs.ddp_full)


def test_sigterm_on_one_rank_stops_all_ranks_at_the_same_step(pkgs, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--max-steps", "100000",
                     "--eval-every", "0"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 2 |"):
            os.kill(read_control(run)["ranks"][1]["pid"], signal.SIGTERM)
    assert proc.wait(timeout=SAFETY_TIMEOUT_S) == 0, "".join(output)[-3000:]
    record = read_control(run)
    stopped_at = record["step"]
    assert record["state"] == "stopped" and stopped_at >= 2
    assert f"stop requested: saving step {stopped_at}, then exiting\n" in output
    saved = run / "checkpoints" / f"step-{stopped_at:08d}"
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["step"] == stopped_at and manifest["world_size"] == 2
    assert (saved / "rng-rank0.pt").is_file() and (saved / "rng-rank1.pt").is_file()
    assert max(losses_by_step(run)) == stopped_at
    # the stop's checkpoint continues exactly
    resumed = torchrun(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--max-steps", "8",
                       "--eval-every", "0", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert_same_losses(run, pkgs.ddp_full)


def test_sigterm_during_eval_stops_before_the_eval_ends(pkgs, tmp_path):
    run = tmp_path / "run"
    # rank 1 gets SIGTERM while it evaluates its first eval batch, at step 4
    patch = (
        "import fgc_runtime.data as data\n"
        "original = data.eval_batches\n"
        "def eval_batches(*args, **kwargs):\n"
        "    for i, batch in enumerate(original(*args, **kwargs)):\n"
        "        if RANK == 1 and i == 0:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        yield batch\n"
        "data.eval_batches = eval_batches\n"
    )
    script = wrapper(tmp_path, "term_in_eval", patch)
    proc = subprocess.run(
        torchrun_cmd(script, pkgs.ddp, "--output-dir", run, "--log-every", "1"),
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # no eval line: the eval was cut short
    assert "eval_loss" not in proc.stdout
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    assert read_control(run)["state"] == "stopped"


def test_sigterm_to_torchrun_saves_before_torchrun_exits(pkgs, tmp_path):
    """torchrun passes a SIGTERM of its own on to every worker; they save the same step and exit 0,
    while torchrun itself reports the signal (see docs/training.md)."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--max-steps", "100000",
                     "--eval-every", "0"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 2 |"):
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=SAFETY_TIMEOUT_S)
    record = read_control(run)
    assert record["state"] == "stopped", "".join(output)[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{record['step']:08d}"
    assert "exitcode: 1" not in "".join(output)  # no worker failed


def test_control_save_and_stop_a_running_job(pkgs, tmp_path):
    run = tmp_path / "run"
    train = pkgs.basic / "train.py"
    proc = subprocess.Popen(
        [sys.executable, str(train), "--output-dir", str(run), "--log-every", "1", "--max-steps", "100000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 2 |"):
            save = python(train, "--control", "save", "--output-dir", run, cwd=tmp_path)
            assert save.returncode == 0 and f"sent SIGUSR1 to rank 0 (pid {proc.pid})" in save.stdout
        if line.startswith("save requested: saving step"):
            saved_at = int(line.split()[-1])
            assert (run / "checkpoints" / f"step-{saved_at:08d}" / "manifest.json").is_file()
            stop = python(train, "--control", "stop", "--output-dir", run, cwd=tmp_path)
            assert stop.returncode == 0 and "sent SIGTERM" in stop.stdout
    assert proc.wait(timeout=SAFETY_TIMEOUT_S) == 0, "".join(output)[-3000:]
    stopped = [line for line in output if line.startswith("stop requested")]
    assert len(stopped) == 1
    stopped_at = int(stopped[0].split()[4].rstrip(","))
    assert stopped_at > saved_at
    assert checkpoints(run) == ["latest", f"step-{saved_at:08d}", f"step-{stopped_at:08d}"]
    assert read_control(run)["state"] == "stopped" and read_control(run)["step"] == stopped_at
    again = python(train, "--control", "stop", "--output-dir", run, cwd=tmp_path)
    assert again.returncode == 2 and again.stderr == (
        f"{run / 'control.json'}: error: no running job: rank 0 (pid {proc.pid}) is not running "
        f"(last recorded state: stopped at step {stopped_at})\n"
    )


def test_control_abort_kills_every_rank_without_saving(pkgs, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_cmd(pkgs.ddp / "train.py", "--output-dir", run, "--log-every", "1", "--max-steps", "100000",
                     "--save-every", "0", "--eval-every", "0"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    for line in proc.stdout:
        if line.startswith("step 2 |"):
            abort = python(pkgs.ddp / "train.py", "--control", "abort", "--output-dir", run, cwd=tmp_path)
            assert abort.returncode == 0, abort.stderr
            assert "rank 0 (pid" in abort.stdout and "rank 1 (pid" in abort.stdout
    assert proc.wait(timeout=SAFETY_TIMEOUT_S) != 0
    assert not (run / "checkpoints").exists()
    status = python(pkgs.ddp / "train.py", "--control", "status", "--output-dir", run, cwd=tmp_path)
    assert "not running: it exited without a clean stop (crashed or killed)" in status.stdout


def test_exception_on_one_rank_brings_the_job_down(pkgs, tmp_path):
    run = tmp_path / "run"
    patch = (
        "import fgc_runtime.data as data\n"
        "original = data.BatchSampler.batch\n"
        "def batch(self, index):\n"
        "    if RANK == 1 and index == 2:\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    return original(self, index)\n"
        "data.BatchSampler.batch = batch\n"
    )
    script = wrapper(tmp_path, "fail", patch)
    proc = subprocess.run(
        torchrun_cmd(script, pkgs.ddp, "--output-dir", run, "--log-every", "1", "--max-steps", "100000"),
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in proc.stderr
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert not (run / "checkpoints").exists()

