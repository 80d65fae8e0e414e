"""fgc_runtime.threads: the threads each training process computes with on the CPU, and the
generated trainer's --cpu-threads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_fgc, small_config
from fgc_runtime import threads
from fgc_runtime.errors import RunError

# a torchrun worker's environment: one of 2 processes on its node, OMP_NUM_THREADS=1
WORKER = {"TORCHELASTIC_RUN_ID": "run", "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
REPLACED = (
    "CPU threads: 8 a process, this node's 16 cores over its 2 processes "
    "(in place of torchrun's OMP_NUM_THREADS=1; --cpu-threads N sets them)"
)


def test_torchruns_one_thread_becomes_the_nodes_cores_over_its_processes():
    # torchrun's own environment had no OMP_NUM_THREADS: torchrun set the 1
    assert threads.choose(None, WORKER, {"PATH": "/bin"}, 16) == (8, REPLACED)
    assert threads.choose(None, dict(WORKER, LOCAL_WORLD_SIZE="4"), {}, 16)[0] == 4
    assert threads.choose(None, dict(WORKER, LOCAL_WORLD_SIZE="3"), {}, 16)[0] == 5  # whole threads, none shared
    # 3 cores over 2 processes: 1 each, torchrun's own choice, so nothing is set or said
    assert threads.choose(None, WORKER, {}, 3) == (None, None)


@pytest.mark.parametrize(
    "environ, parent",
    [
        (WORKER, {"OMP_NUM_THREADS": "1"}),  # the user set it, torchrun passed it on
        (dict(WORKER, OMP_NUM_THREADS="4"), {"OMP_NUM_THREADS": "4"}),
        (WORKER, None),  # torchrun's environment cannot be read: not known to be its default
        ({"OMP_NUM_THREADS": "1"}, {}),  # not a torchrun worker
        (dict(WORKER, LOCAL_WORLD_SIZE="1"), {}),  # alone on its node (torchrun sets nothing then)
        (dict(WORKER, LOCAL_WORLD_SIZE="x"), {}),
        ({k: v for k, v in WORKER.items() if k != "OMP_NUM_THREADS"}, {}),  # torch's own count
    ],
)
def test_any_other_thread_count_is_left_as_it_is(environ, parent):
    assert threads.choose(None, environ, parent, 16) == (None, None)


def test_the_flag_chooses_whatever_the_environment_says():
    assert threads.choose(3, {}, None, 16) == (3, "CPU threads: 3 a process (--cpu-threads)")
    assert threads.choose(2, WORKER, {"OMP_NUM_THREADS": "1"}, 16) == (2, "CPU threads: 2 a process (--cpu-threads)")
    # more threads than the node has cores, over its processes: said
    assert threads.choose(3, WORKER, {}, 4) == (3, "CPU threads: 3 a process (--cpu-threads), 6 on this node's 4 cores")
    assert threads.choose(2, {}, None, 1)[1] == "CPU threads: 2 a process (--cpu-threads), 2 on this node's 1 core"


def test_set_cpu_threads_sets_torchs_thread_count(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(WORKER))
    monkeypatch.setattr(threads, "parent_environ", lambda: {})
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # 2 cores over 2 processes: torchrun's 1 stands
        assert threads.set_cpu_threads() is None and torch.get_num_threads() == 1
        monkeypatch.setattr(threads, "usable_cores", lambda: 4)
        assert threads.set_cpu_threads() == (
            "CPU threads: 2 a process, this node's 4 cores over its 2 processes "
            "(in place of torchrun's OMP_NUM_THREADS=1; --cpu-threads N sets them)"
        )
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        # not a CPU device: only the flag sets them
        assert threads.set_cpu_threads(auto=False) is None and torch.get_num_threads() == 1
        assert threads.set_cpu_threads(3, auto=False) == (
            "CPU threads: 3 a process (--cpu-threads), 6 on this node's 4 cores"
        )
        assert torch.get_num_threads() == 3
        with pytest.raises(RunError, match=r"--cpu-threads 5: more than this machine's 4 CPUs$"):
            threads.set_cpu_threads(5)
    finally:
        torch.set_num_threads(before)


def _topology(sysfs: Path, cpu: int, package: int, core: int) -> None:
    topology = sysfs / f"cpu{cpu}" / "topology"
    topology.mkdir(parents=True)
    (topology / "physical_package_id").write_text(f"{package}\n")
    (topology / "core_id").write_text(f"{core}\n")


def test_hyperthreads_of_one_core_count_once(tmp_path):
    # 2 packages of 2 cores, each core with 2 hyperthreads (CPUs 0-7)
    for cpu in range(8):
        _topology(tmp_path, cpu, package=cpu // 4, core=(cpu // 2) % 2)
    assert threads.physical_cores(set(range(8)), tmp_path) == 4
    # the same core id in another package is another core
    assert threads.physical_cores({0, 4}, tmp_path) == 2
    assert threads.physical_cores({0, 1}, tmp_path) == 1
    # a CPU the kernel does not describe: every CPU counts
    assert threads.physical_cores({0, 1, 9}, tmp_path) == 3


def test_a_cgroups_cpu_quota_caps_the_cores(tmp_path, monkeypatch):
    root = tmp_path / "cgroup"
    # cgroup v2: the job's group allows 1.5 CPUs, its child none of its own
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("150000 100000\n")
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup.txt"
    proc.write_text("0::/job/step\n")
    assert threads.cgroup_cpu_limit(proc, root) == 1.5
    # cgroup v1: the cpu controller's quota (-1: none)
    (root / "cpu,cpuacct" / "docker" / "c1").mkdir(parents=True)
    (root / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_quota_us").write_text("300000\n")
    (root / "cpu,cpuacct" / "docker" / "c1" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n0::/\n")
    assert threads.cgroup_cpu_limit(proc, root) == 3.0
    proc.write_text("3:cpu,cpuacct:/\n0::/\n")
    assert threads.cgroup_cpu_limit(proc, root) is None
    assert threads.cgroup_cpu_limit(tmp_path / "missing", root) is None
    # usable_cores: the affinity's cores, capped by the quota rounded up
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda cpus: len(cpus))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cores() == 3
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cores() == 8


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_a_processs_starting_environment_is_read_from_proc():
    child = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.environ['LATER'] = '1'; print('ready', flush=True); sys.stdin.read()"],
        env={"FGC_TEST_VALUE": "a=b c", "PATH": os.environ.get("PATH", "")},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        # started (just after its exec, the kernel may not have laid out its environment yet)
        assert child.stdout.readline() == b"ready\n"
        environ = threads.parent_environ(child.pid)
        assert environ["FGC_TEST_VALUE"] == "a=b c"
        # what the process sets in itself is not in what it started with
        assert "LATER" not in environ
    finally:
        child.communicate(b"")
    assert threads.parent_environ(2**22 + 12345) is None  # no such process
    # an empty environment is not known to lack OMP_NUM_THREADS: read as unknown
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()"],
        env={}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout.readline() == b"ready\n"
        assert threads.parent_environ(child.pid) is None
    finally:
        child.communicate(b"")


DETECT = """
import os, sys
sys.path.insert(0, sys.argv[1])
from fgc_runtime import threads
# one write of the whole line: the two ranks share the pipe
sys.stdout.write(f"{os.environ['RANK']} {threads.torchrun_set_one_thread(os.environ, threads.parent_environ())}\\n")
sys.stdout.flush()
"""


@pytest.mark.slow  # two torchrun launches
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_torchruns_own_one_thread_is_told_from_the_users(tmp_path):
    """Under torchrun with OMP_NUM_THREADS unset, torchrun sets it to 1 in its workers; set by the
    user, it is in torchrun's own environment too. The workers tell the two apart."""
    script = tmp_path / "detect.py"
    script.write_text(DETECT)
    runtime = tmp_path / "pkg"
    runtime.mkdir()
    (runtime / "fgc_runtime").symlink_to(REPO / "runtime")
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    seen = {}
    for name, env in (("torchrun's", base), ("the user's", dict(base, OMP_NUM_THREADS="1"))):
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script, runtime],
            capture_output=True, text=True, env=env,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        seen[name] = sorted(run.stdout.split("\n")[:-1])
    assert seen == {"torchrun's": ["0 True", "1 True"], "the user's": ["0 False", "1 False"]}


def test_the_generated_trainer_takes_cpu_threads(tmp_path):
    """`--cpu-threads N` sets the threads and says so after the host memory's line; a bad count is
    a one-line error, exit status 2."""
    config = small_config(tmp_path)
    build = tmp_path / "build"
    run_fgc("build", config, "-o", build, check=True)

    def dry_run(*flags):
        return subprocess.run(
            [sys.executable, build / "train.py", "--dry-run", "--device", "cpu", "--output-dir", tmp_path / "out", *flags],
            capture_output=True, text=True,
        )

    run = dry_run("--cpu-threads", "1")
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    at = lines.index("CPU threads: 1 a process (--cpu-threads)")
    assert lines[at - 1].startswith("host memory: ") and lines[at + 1].startswith("dry run: loss")
    # without the flag, one process keeps torch's count and says nothing
    run = dry_run()
    assert run.returncode == 0 and not any(line.startswith("CPU threads") for line in run.stdout.splitlines())
    cpus = os.cpu_count()
    run = dry_run("--cpu-threads", str(cpus + 1))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --cpu-threads {cpus + 1}: more than this machine's {cpus} CPU{'s' * (cpus != 1)}"
    )
    run = dry_run("--cpu-threads", "0")
    assert run.returncode == 2 and "argument --cpu-threads: expected a whole number at least 1, got 0" in run.stderr


def test_outside_torchruns_default_the_cores_are_not_counted(monkeypatch):
    """One process, or a user's OMP_NUM_THREADS: nothing to set, and no sysfs or cgroup file read."""

    def counted():
        raise AssertionError("the cores were counted")

    monkeypatch.setattr(threads, "usable_cores", counted)
    monkeypatch.setattr(os, "environ", {"PATH": "/bin"})
    assert threads.set_cpu_threads() is None
    monkeypatch.setattr(os, "environ", dict(WORKER))
    monkeypatch.setattr(threads, "parent_environ", lambda: {"OMP_NUM_THREADS": "1"})
    assert threads.set_cpu_threads() is None
