"""The trainer's process safety (issue #13, items 7, 11, 15 and 16).

- One run per output dir: rank 0 locks OUTPUT_DIR/.fgc-lock; a second run is refused on every rank
  with one line naming the holder, and a lock left by a dead process is no lock.
- `train.py --control` signals only a positive pid whose /proc start time and command line are
  those of the job's record; a hostile or damaged control.json is a one-line error, and nothing is
  signalled.
- A package runs with torch alone (no numpy): every trainer type, in a venv that has only torch.
- Ctrl-C: the first SIGINT saves and exits 0, a second one exits 130 at once, without traceback;
  through launch.sh too, and under a plain torchrun (whose own exit status is 1).

The signal tests start each job in a process group of its own and send SIGINT to the group, as a
terminal's Ctrl-C does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_fgc, small_config
from fgc_runtime import control
from fgc_runtime.distributed import DistInfo
from fgc_runtime.errors import RunError

# launch.sh runs `torchrun`: the one installed beside this Python
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
SAFETY_TIMEOUT_S = 900  # against a hang; no assertion is made on time
HOST = socket.gethostname()
ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
INTERRUPTED = "interrupted: saving step {}, then exiting (Ctrl-C again to stop at once)\n"
INTERRUPTED_AGAIN = "interrupted again: exiting at once, without saving\n"


def build(tmp_path: Path, name: str, *defines: str) -> Path:
    """A small package (tests/conftest.py small_config) built into TMP_PATH/NAME."""
    cfg_dir = tmp_path / f"{name}-config"
    cfg_dir.mkdir(exist_ok=True)
    out = tmp_path / name
    run_fgc("build", small_config(cfg_dir), "-o", out, *[a for d in defines for a in ("-D", d)], check=True)
    return out


def torchrun_cmd(python, *args) -> list[str]:
    return [str(python), "-m", "torch.distributed.run", "--nproc-per-node", "2", *map(str, args)]


def as_a_terminal_job() -> None:
    """A preexec_fn: Ctrl-C's signals at their defaults, as a terminal's foreground job has them.
    The suite may run where they are ignored (a non-interactive shell ignores SIGINT and SIGQUIT
    in the commands it starts with `&`), and a process started with SIGINT ignored keeps it
    ignored: the trainer would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)


def start(cmd, cwd, env=None) -> subprocess.Popen:
    """CMD in a process group of its own, as a terminal runs a foreground job, output merged."""
    return subprocess.Popen(
        [str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=ENV if env is None else env, start_new_session=True, preexec_fn=as_a_terminal_job,
    )


def read_until(proc: subprocess.Popen, prefix: str, output: list[str]) -> str:
    """Read PROC's lines into OUTPUT until one starts with PREFIX; that line."""
    for line in proc.stdout:
        output.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting with {prefix!r}:\n" + "".join(output)[-3000:])


def finish(proc: subprocess.Popen, output: list[str]) -> str:
    output.extend(proc.stdout)
    proc.wait(timeout=SAFETY_TIMEOUT_S)
    return "".join(output)


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def complete_checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").glob("step-*") if (p / "manifest.json").is_file())


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    """A basic and a DDP package of the small config (no evaluation: the runs are about signals)."""
    root = tmp_path_factory.mktemp("safety")
    return {
        "root": root,
        "basic": build(root, "basic", "trainer_type=basic", "eval_every=0"),
        "ddp": build(root, "ddp", "trainer_type=ddp", "eval_every=0"),
    }


# ---- requirements.txt ------------------------------------------------------------------------


def test_requirements_name_torch_and_each_optional_package_with_what_needs_it(tmp_path):
    pkg = build(tmp_path, "pkg", "trainer_type=basic")
    assert (pkg / "requirements.txt").read_text() == (
        "torch>=2.4\n"
        "# optional: tensorboard (TensorBoard event files in OUTPUT_DIR/tensorboard/)\n"
        "# optional: jinja2 (generate.py --chat: rendering the tokenizer's chat template)\n"
        "# optional: tokenizers (generate.py and text samples during training, when the data has a Hugging Face tokenizer.json)\n"
        "# optional: torchao (train.py --export-hf DIR --quantize RECIPE)\n"
        "# optional: triton (the Triton kernels, on a CUDA GPU; the torch code runs without it)\n"
    )


# ---- one run per output dir ------------------------------------------------------------------


def test_the_output_dir_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    run = tmp_path / "run"
    first = control.Control()
    first.lock_output_dir(run, ONE_PROCESS)
    holder = json.loads((run / ".fgc-lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", holder["since"])
    # a second lock (another open file, as another process would have) is refused
    with pytest.raises(RunError) as refused:
        control.Control().lock_output_dir(run, ONE_PROCESS)
    assert refused.value.path == str(run)
    assert re.fullmatch(
        rf"the output dir is in use by pid {os.getpid()} on {re.escape(HOST)} since \S+ \(.+\): "
        "wait for it to finish, or use another --output-dir",
        refused.value.message,
    )
    assert "\n" not in str(refused.value)
    assert json.loads((run / ".fgc-lock").read_text()) == holder  # the refused run changed nothing
    first._lock.close()  # as at the first holder's exit
    control.Control().lock_output_dir(run, ONE_PROCESS)


def test_a_lock_left_by_a_killed_process_is_no_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, torch\n"
         "from fgc_runtime import control\n"
         "from fgc_runtime.distributed import DistInfo\n"
         "ctl = control.Control()\n"
         "ctl.lock_output_dir(sys.argv[1], DistInfo(0, 0, 1, torch.device('cpu'), None))\n"
         "print('locked', flush=True)\n"
         "time.sleep(3600)\n",
         str(run)],
        stdout=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path,
    )
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(RunError, match=f"in use by pid {holder.pid} "):
        control.Control().lock_output_dir(run, ONE_PROCESS)
    holder.kill()
    holder.wait(timeout=SAFETY_TIMEOUT_S)
    assert (run / ".fgc-lock").is_file()  # the file stays; the lock went with the process
    control.Control().lock_output_dir(run, ONE_PROCESS)


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_on_every_rank(pkgs, tmp_path):
    run = tmp_path / "run"
    train = pkgs["basic"] / "train.py"
    first = start([sys.executable, train, "--output-dir", run, "--log-every", "1", "--max-steps", "100000",
                   "--save-every", "2"], cwd=tmp_path)
    output = []
    read_until(first, "step 3 |", output)
    in_use = re.compile(
        rf"{re.escape(str(run))}: error: the output dir is in use by pid {first.pid} on {re.escape(HOST)} "
        r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(\S*python\S* \S*train\.py --output-dir .*\): "
        r"wait for it to finish, or use another --output-dir\n"
    )
    # a fresh run would truncate metrics.jsonl and overwrite the checkpoints: refused first
    second = subprocess.run([sys.executable, train, "--output-dir", run, "--resume", "never"], cwd=tmp_path,
                            capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert second.returncode == 2 and second.stdout == ""
    assert in_use.fullmatch(second.stderr), second.stderr
    # two ranks under torchrun: rank 0 says why, both leave at once with status 2 (none waits at a
    # collective; torchrun may end the second to leave with SIGTERM once the first has)
    ddp = subprocess.run(torchrun_cmd(sys.executable, pkgs["ddp"] / "train.py", "--output-dir", run),
                         cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert ddp.returncode != 0
    lines = [line + "\n" for line in ddp.stderr.splitlines() if "in use by" in line]
    assert len(lines) == 1 and in_use.fullmatch(lines[0]), ddp.stderr[-3000:]
    assert "exitcode  : 2 (pid" in ddp.stderr, ddp.stderr[-3000:]
    # what does not train does not take the lock
    status = subprocess.run([sys.executable, train, "--control", "status", "--output-dir", run], cwd=tmp_path,
                            capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert status.returncode == 0 and f"rank 0 is pid {first.pid} on {HOST}, running" in status.stdout
    dry = subprocess.run([sys.executable, train, "--dry-run", "--output-dir", run], cwd=tmp_path,
                         capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert dry.returncode == 0, dry.stderr
    first.send_signal(signal.SIGTERM)
    assert finish(first, output) and first.returncode == 0
    steps = steps_logged(run)
    assert steps == list(range(1, len(steps) + 1))  # every step logged once: nobody interleaved
    # the holder is gone: the next run takes the directory (and resumes the first run's last save)
    after = subprocess.run([sys.executable, train, "--output-dir", run, "--max-steps", str(steps[-1] + 1)],
                           cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert after.returncode == 0, after.stderr
    assert f"resuming from {run}/checkpoints/step-{steps[-1]:08d} at step {steps[-1]}" in after.stdout


# ---- --control and hostile control.json files -------------------------------------------------


@pytest.fixture
def sleeper():
    """An unrelated live process of this user."""
    proc = subprocess.Popen(["sleep", "3600"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def signals(monkeypatch, sleeper):
    """Every signal --control sends, recorded; only the sleeper's can really be sent (so that a
    pid of -1 or 0 cannot take down the test run), and existence probes (signal 0) pass through."""
    sent = []
    real_kill, real_pidfd_send = os.kill, getattr(signal, "pidfd_send_signal", None)

    def kill(pid, signum):
        if signum == 0:
            return real_kill(pid, 0)
        sent.append((pid, signum))
        if pid == sleeper.pid:
            real_kill(pid, signum)

    def pidfd_send_signal(fd, signum, *args):
        pid = int(re.search(r"^Pid:\s*(-?\d+)", Path(f"/proc/self/fdinfo/{fd}").read_text(), re.M)[1])
        sent.append((pid, signum))
        if pid == sleeper.pid:
            real_pidfd_send(fd, signum, *args)

    monkeypatch.setattr(os, "kill", kill)
    if real_pidfd_send is not None:
        monkeypatch.setattr(signal, "pidfd_send_signal", pidfd_send_signal)
    return sent


def identity(pid: int) -> tuple[int, list[str]]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    start = int(stat[stat.rindex(")") + 2:].split()[19])
    return start, Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")


def record(pid, **changes) -> dict:
    """A job record as a training rank 0 writes it, for PID (this test's sleeper)."""
    start, cmdline = identity(pid) if type(pid) is int and pid > 0 else (1, ["python", "train.py"])
    rank = {"rank": 0, "host": HOST, "pid": pid, "start": start, "cmdline": cmdline}
    rec = {
        "format": "fgc-control", "version": 1, "pid": pid, "host": HOST, "world_size": 1, "ranks": [rank],
        "state": "training", "step": 5, "max_steps": 100, "started": "2026-01-01T00:00:00Z",
        "updated": "2026-01-01T00:00:01Z",
    }
    for key, value in changes.items():
        if key.startswith("rank_"):
            rank[key[5:]] = value
        else:
            rec[key] = value
    return rec


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


HOSTILE = {
    # no start time: nothing to compare, the record the issue's `abort` took for a live job
    "pid -1": lambda pid: record(-1, rank_pid=-1, rank_start=None),
    "pid 0": lambda pid: record(0, rank_pid=0, rank_start=None),
    "pid -1 for rank 0 only": lambda pid: record(pid, rank_pid=-1),
    "pid as a string": lambda pid: record(str(pid), rank_pid=str(pid)),
    "pid true": lambda pid: record(True, rank_pid=True),
    "pid of another process": lambda pid: record(pid, rank_start=identity(pid)[0] + 1),
    "pid of another command": lambda pid: record(pid, rank_cmdline=["python", "train.py"]),
    "no ranks": lambda pid: without(record(pid), "ranks"),
    "a rank without pid": lambda pid: record(pid, ranks=[without(record(pid)["ranks"][0], "pid")]),
    "an unknown field": lambda pid: record(pid, signal="KILL"),
    "ranks not a list": lambda pid: record(pid, ranks={"0": 1}),
    "not json": lambda pid: "{'pid': -1",
    "a list": lambda pid: [record(pid)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.parametrize("action", ["abort", "stop"])
def test_hostile_control_json_signals_nothing(case, action, tmp_path, sleeper, signals):
    path = tmp_path / "control.json"
    content = HOSTILE[case](sleeper.pid)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(RunError) as err:
        control.send(action, tmp_path)
    assert err.value.path == str(path) and "\n" not in str(err.value)
    assert signals == []
    assert sleeper.poll() is None  # the unrelated process lives on
    if case.startswith("pid of another"):
        assert err.value.message == (
            f"rank 0 (pid {sleeper.pid}) is not the job's process any more: nothing was signalled"
        )
    elif case.startswith("pid"):
        assert err.value.message.startswith("not a valid job record: ")


def test_hostile_control_json_through_train_py_is_one_line_and_exit_2(tmp_path, sleeper):
    """The whole command: a record naming an unrelated live process (which the old code killed)."""
    pkg = build(tmp_path, "pkg", "trainer_type=basic")
    run = tmp_path / "run"
    run.mkdir()
    (run / "control.json").write_text(json.dumps(record(sleeper.pid, rank_start=identity(sleeper.pid)[0] + 1)))
    proc = subprocess.run([sys.executable, pkg / "train.py", "--control", "abort", "--output-dir", run],
                          capture_output=True, text=True, env=ENV, timeout=SAFETY_TIMEOUT_S)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        f"{run / 'control.json'}: error: rank 0 (pid {sleeper.pid}) is not the job's process any more: "
        "nothing was signalled\n"
    )
    assert sleeper.poll() is None


def test_control_signals_the_process_that_matches_its_record(tmp_path, sleeper, signals):
    (tmp_path / "control.json").write_text(json.dumps(record(sleeper.pid)))
    control.send("stop", tmp_path)
    assert signals == [(sleeper.pid, signal.SIGTERM)]
    assert sleeper.wait(timeout=SAFETY_TIMEOUT_S) == -signal.SIGTERM


def test_without_proc_save_stop_and_abort_are_refused(tmp_path, monkeypatch, sleeper, signals):
    (tmp_path / "control.json").write_text(json.dumps(record(sleeper.pid)))
    monkeypatch.setattr(control, "_PROC", tmp_path / "no-proc")
    for action in ("save", "stop", "abort"):
        with pytest.raises(RunError) as err:
            control.send(action, tmp_path)
        assert err.value.message == (
            f"--control {action} checks through /proc that rank 0 (pid {sleeper.pid}) is still the job's "
            "process, and this system has no /proc: nothing was signalled"
        )
    assert signals == [] and sleeper.poll() is None
    control.send("status", tmp_path)  # reading the record needs no /proc


# ---- Ctrl-C ----------------------------------------------------------------------------------

# In a copy of a package: once a stop is agreed, each rank says so in a file and then waits, as
# during a long save, so that a second Ctrl-C surely comes before the save ends.
SLOW_STOP = """

# ---- test patch (tests/test_safety_process.py): a save that takes until a second Ctrl-C
_test_poll = Control.poll


def _test_slow_poll(self, step):
    request = _test_poll(self, step)
    if request.stop:
        Path(os.environ["FGC_TEST_MARKERS"], f"stopping-rank{_rank()}").write_text(str(step))
        while True:
            time.sleep(0.05)
    return request


Control.poll = _test_slow_poll
"""


def slow_stop_copy(pkg: Path, tmp_path: Path) -> Path:
    copy = tmp_path / f"{pkg.name}-slow-stop"
    shutil.copytree(pkg, copy)
    with open(copy / "fgc_runtime" / "control.py", "a") as f:
        f.write(SLOW_STOP)
    return copy


def wait_for_markers(proc: subprocess.Popen, markers: Path, n: int, output: list[str]) -> None:
    """Wait until N ranks have written their marker (then they print nothing more: poll)."""
    while len(list(markers.glob("stopping-rank*"))) < n:
        assert proc.poll() is None, "the job ended before its ranks stopped:\n" + finish(proc, output)[-3000:]
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_0_and_a_second_one_stops_at_once(pkgs, tmp_path):
    train = pkgs["basic"] / "train.py"
    run = tmp_path / "run"
    job = start([sys.executable, train, "--output-dir", run, "--log-every", "1", "--max-steps", "100000"],
                cwd=tmp_path)
    output = []
    read_until(job, "step 3 |", output)
    os.killpg(job.pid, signal.SIGINT)
    text = finish(job, output)
    assert job.returncode == 0, text[-3000:]
    stopped = json.loads((run / "control.json").read_text())
    step = stopped["step"]
    assert stopped["state"] == "stopped" and step >= 3
    assert text.count("interrupted") == 1 and INTERRUPTED.format(step) in output
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert complete_checkpoints(run)[-1] == f"step-{step:08d}"
    assert steps_logged(run)[-1] == step

    # again, with a save that lasts until a second Ctrl-C: the job ends at once, saving nothing
    slow = slow_stop_copy(pkgs["basic"], tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    env = dict(ENV, FGC_TEST_MARKERS=str(markers))
    job = start(
        [sys.executable, slow / "train.py", "--output-dir", run, "--log-every", "1", "--max-steps", "100000",
         "--save-every", "0"],
        cwd=tmp_path, env=env,
    )
    output = []
    read_until(job, f"step {step + 2} |", output)
    os.killpg(job.pid, signal.SIGINT)
    wait_for_markers(job, markers, 1, output)
    os.killpg(job.pid, signal.SIGINT)
    text = finish(job, output)
    assert job.returncode == 130, text[-3000:]
    again = int((markers / "stopping-rank0").read_text())
    assert INTERRUPTED.format(again) in output and output[-1] == INTERRUPTED_AGAIN
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert complete_checkpoints(run)[-1] == f"step-{step:08d}"  # nothing saved since


@pytest.mark.slow
def test_ctrl_c_through_launch_sh_stops_every_rank_cleanly(pkgs, tmp_path):
    launch = pkgs["ddp"] / "launch.sh"
    run = tmp_path / "run"
    job = start([launch, "--", "--output-dir", run, "--log-every", "1", "--max-steps", "100000"], cwd=tmp_path)
    output = []
    read_until(job, "step 3 |", output)
    os.killpg(job.pid, signal.SIGINT)  # launch.sh's group: torchrun runs in a group of its own
    text = finish(job, output)
    assert job.returncode == 0, text[-3000:]
    stopped = json.loads((run / "control.json").read_text())
    step = stopped["step"]
    assert stopped["state"] == "stopped"
    assert text.count("interrupted") == 1 and INTERRUPTED.format(step) in output
    assert "Traceback" not in text
    saved = run / "checkpoints" / f"step-{step:08d}"
    assert json.loads((saved / "manifest.json").read_text())["world_size"] == 2
    assert (saved / "rng-rank0.pt").is_file() and (saved / "rng-rank1.pt").is_file()

    # a second Ctrl-C while the ranks save: every rank exits at once, and launch.sh with 130
    slow = slow_stop_copy(pkgs["ddp"], tmp_path)
    markers = tmp_path / "markers"
    markers.mkdir()
    job = start(
        [slow / "launch.sh", "--", "--output-dir", run, "--log-every", "1", "--max-steps", "100000", "--save-every", "0"],
        cwd=tmp_path, env=dict(ENV, FGC_TEST_MARKERS=str(markers)),
    )
    output = []
    read_until(job, f"step {step + 2} |", output)
    os.killpg(job.pid, signal.SIGINT)
    wait_for_markers(job, markers, 2, output)
    os.killpg(job.pid, signal.SIGINT)
    text = finish(job, output)
    assert job.returncode == 130, text[-3000:]
    assert text.count(INTERRUPTED_AGAIN) == 1  # rank 0's line
    assert "exitcode  : 130" in text  # torchrun's report: the ranks ended by the second Ctrl-C
    assert "]: Traceback" not in text  # no rank printed a traceback
    assert complete_checkpoints(run)[-1] == f"step-{step:08d}"


@pytest.mark.slow
def test_ctrl_c_to_a_plain_torchrun_saves_and_torchrun_exits_1(pkgs, tmp_path):
    """torchrun starts its workers in sessions of their own, so a Ctrl-C reaches torchrun alone; it
    sends SIGINT on to every worker once (they save and exit 0) and then exits 1 itself, with its
    SignalException (see docs/training.md)."""
    run = tmp_path / "run"
    job = start(torchrun_cmd(sys.executable, pkgs["ddp"] / "train.py", "--output-dir", run, "--log-every", "1",
                             "--max-steps", "100000"), cwd=tmp_path)
    output = []
    read_until(job, "step 3 |", output)
    os.killpg(job.pid, signal.SIGINT)
    text = finish(job, output)
    assert job.returncode == 1, text[-3000:]
    assert "SignalException: Process" in text and "got signal: 2" in text
    stopped = json.loads((run / "control.json").read_text())
    assert stopped["state"] == "stopped", text[-3000:]
    assert INTERRUPTED.format(stopped["step"]) in output
    assert complete_checkpoints(run)[-1] == f"step-{stopped['step']:08d}"
    assert "exitcode  :" not in text  # no worker failed


# ---- a package needs only torch ----------------------------------------------------------------

TRAINERS = ["basic", "ddp", "fsdp2", "pipeline", "diloco"]


@pytest.fixture(scope="session")
def torch_only(tmp_path_factory) -> Path:
    """The python of a venv with torch and its own dependencies only (numpy is not one of them).

    It needs the package registries (CI has them): without them this fails, saying so.
    """
    venv = tmp_path_factory.mktemp("torch-only") / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    assert made.returncode == 0, f"cannot create a venv with `{sys.executable} -m venv`:\n{made.stderr}"
    python = venv / "bin" / "python"
    version = torch.__version__.split("+")[0]
    pip = subprocess.run([str(python), "-m", "pip", "install", f"torch=={version}"], capture_output=True,
                         text=True, env=venv_env())
    assert pip.returncode == 0, (
        f"pip could not install torch=={version} into a fresh venv ({venv}); this test needs the package "
        f"registries (or a local torch wheel) to make a venv with only torch:\n{pip.stdout[-2000:]}{pip.stderr[-2000:]}"
    )
    return python


def venv_env() -> dict:
    """The environment of the venv's runs: nothing of this environment's packages leaks in."""
    env = {k: v for k, v in ENV.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return dict(env, PYTHONNOUSERSITE="1")


@pytest.mark.slow
def test_every_trainer_runs_with_only_torch(torch_only, tmp_path):
    env = venv_env()
    probe = subprocess.run([str(torch_only), "-c", "import numpy"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "No module named 'numpy'" in probe.stderr
    pkgs = {t: build(tmp_path, t, f"trainer_type={t}", "max_steps=3", "eval_every=2") for t in TRAINERS}
    for trainer, pkg in pkgs.items():
        run = tmp_path / f"run-{trainer}"
        cmd = [torch_only, pkg / "train.py"] if trainer == "basic" else torchrun_cmd(torch_only, pkg / "train.py")
        proc = subprocess.run([str(c) for c in cmd] + ["--output-dir", str(run)], cwd=tmp_path, capture_output=True,
                              text=True, env=env, timeout=SAFETY_TIMEOUT_S)
        assert proc.returncode == 0, f"{trainer}:\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, f"{trainer}:\n{proc.stderr[-3000:]}"
        assert "step 2 | eval_loss" in proc.stdout and "step 3 | loss" in proc.stdout, trainer
        assert complete_checkpoints(run) == ["step-00000003"], trainer
        assert (run / "final" / "model.safetensors").is_file(), trainer
    # a resume of the DDP run, and an export of it, in the same venv
    run = tmp_path / "run-ddp"
    resumed = subprocess.run(
        [str(c) for c in torchrun_cmd(torch_only, pkgs["ddp"] / "train.py")] + ["--output-dir", str(run),
                                                                                 "--max-steps", "5"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=SAFETY_TIMEOUT_S,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run}/checkpoints/step-00000003 at step 3" in resumed.stdout
    assert complete_checkpoints(run)[-1] == "step-00000005"
    export = subprocess.run(
        [str(torch_only), str(pkgs["ddp"] / "train.py"), "--export-hf", str(tmp_path / "hf"), "--output-dir", str(run)],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=SAFETY_TIMEOUT_S,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()
