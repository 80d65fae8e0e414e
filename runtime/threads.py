"""The threads each training process computes with on the CPU.

torch computes on as many threads as the process has cores to run on, unless ``OMP_NUM_THREADS``
says otherwise. torchrun, starting more than one process on a node and finding
``OMP_NUM_THREADS`` unset, sets it to 1 for every process ("to avoid your system being
overloaded", its warning says): on a CPU device every rank then computes on one thread, however
many cores the node has. A node of 16 cores running 2 ranks uses 2 of them.

``set_cpu_threads()`` replaces that default, and only that: when this process is a torchrun
worker, one of several on its node, whose ``OMP_NUM_THREADS`` of 1 torchrun set (the variable is
not in torchrun's own environment as it started: ``/proc/PARENT/environ``), each process gets
this node's cores over its processes: ``cores // LOCAL_WORLD_SIZE``, at least 1. The cores are
those this process may run on (its CPU affinity, one per physical core: hyperthreads of one core
count once), fewer where the process's cgroup caps its CPU time (``cpu.max``, or cgroup v1's
``cpu.cfs_quota_us``, as ``docker --cpus`` and Kubernetes CPU limits set). An ``OMP_NUM_THREADS`` the user set, and a process torchrun did
not start, are left as they are; ``--cpu-threads N`` (``set_cpu_threads(N)``) chooses N whatever
the environment says.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

from .errors import RunError

# where the kernel describes the CPUs and this process's cgroup
SYSFS_CPU = Path("/sys/devices/system/cpu")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def physical_cores(cpus: set[int], sysfs: Path = SYSFS_CPU) -> int:
    """The physical cores among CPUS (logical CPU numbers): the distinct (package, core) pairs of
    their topology, or len(CPUS) where the kernel does not describe it."""
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            cores.add((package, (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def _quota_v2(group: Path) -> Optional[float]:
    quota, period = (group / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(group: Path) -> Optional[float]:
    quota = int((group / "cpu.cfs_quota_us").read_text())
    return None if quota < 0 else quota / int((group / "cpu.cfs_period_us").read_text())


def cgroup_cpu_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> Optional[float]:
    """The CPUs' worth of time this process's cgroup and its parents allow (the smallest quota
    over its period: ``cpu.max`` of cgroup v2, ``cpu.cfs_quota_us`` of v1's cpu controller), or
    None where none is set or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    hierarchies = []  # (the hierarchy's mount, this process's group in it, its quota's reader)
    for line in lines:
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:
            hierarchies.append((root, path, _quota_v2))
        elif "cpu" in controllers.split(","):
            for mount in dict.fromkeys((root / "cpu", root / controllers)):  # the two names, once each
                hierarchies.append((mount, path, _quota_v1))
    limit = None
    for mount, path, quota_of in hierarchies:
        group = mount / path.lstrip("/")
        while True:
            try:
                cpus = quota_of(group)
            except (OSError, ValueError):
                cpus = None
            if cpus is not None:
                limit = cpus if limit is None else min(limit, cpus)
            if group == mount or mount not in group.parents:
                break
            group = group.parent
    return limit


def usable_cores() -> int:
    """The cores this process may compute on: its CPU affinity's physical cores, capped by its
    cgroup's CPU quota (rounded up), at least 1."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 1))
    cores = physical_cores(cpus)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)


def parent_environ(pid: Optional[int] = None) -> Optional[dict[str, str]]:
    """The environment the process PID (default: this one's parent) started with, or None where it
    cannot be read (not Linux, another user's process) or reads as empty (just after its exec,
    before the kernel has laid it out; or overwritten by the process itself): not known then."""
    pid = os.getppid() if pid is None else pid
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    environ = {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}
    return environ or None


def local_processes(environ: Mapping[str, str]) -> int:
    """The processes on this node of a torchrun job (its LOCAL_WORLD_SIZE); 1 outside torchrun."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return 1
    try:
        return max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def torchrun_set_one_thread(environ: Mapping[str, str], parent: Optional[Mapping[str, str]]) -> bool:
    """Whether ENVIRON is a torchrun worker's, one of several on its node, whose OMP_NUM_THREADS
    of 1 torchrun set: PARENT (torchrun's environment as it started) has none."""
    return (
        local_processes(environ) > 1
        and environ.get("OMP_NUM_THREADS") == "1"
        and parent is not None
        and "OMP_NUM_THREADS" not in parent
    )


def choose(
    requested: Optional[int], environ: Mapping[str, str], parent: Optional[Mapping[str, str]], cores: int
) -> tuple[Optional[int], Optional[str]]:
    """The thread count to set, and the line saying why, or (None, None) to leave torch's: see the
    module's docstring. REQUESTED: ``--cpu-threads``; CORES: :func:`usable_cores`."""
    processes = local_processes(environ)
    if requested is not None:
        line = f"CPU threads: {requested} a process (--cpu-threads)"
        if requested * processes > cores:
            line += f", {requested * processes} on this node's {cores} core{'s' * (cores != 1)}"
        return requested, line
    if not torchrun_set_one_thread(environ, parent):
        return None, None
    threads = max(1, cores // processes)
    if threads == 1:
        return None, None  # torchrun's 1 is this node's share already
    return threads, (
        f"CPU threads: {threads} a process, this node's {cores} cores over its {processes} processes "
        "(in place of torchrun's OMP_NUM_THREADS=1; --cpu-threads N sets them)"
    )


def set_cpu_threads(requested: Optional[int] = None, auto: bool = True) -> Optional[str]:
    """Set the threads torch computes with on the CPU in this process (see the module's docstring):
    REQUESTED when given, else, with AUTO (a CPU device), this node's share of its cores where
    torchrun left one. Returns the line saying what was set, or None where torch's is kept."""
    if requested is None and not auto:
        return None
    cpus = os.cpu_count() or 1
    if requested is not None and requested > cpus:
        raise RunError(f"--cpu-threads {requested}: more than this machine's {cpus} CPU{'s' * (cpus != 1)}")
    parent = parent_environ() if requested is None else None
    if requested is None and not torchrun_set_one_thread(os.environ, parent):
        return None  # torch's count stands: the cores need not be counted
    threads, line = choose(requested, os.environ, parent, usable_cores())
    if threads is not None:
        torch.set_num_threads(threads)
        actual = torch.get_num_threads()
        if actual != threads:
            line += f"; torch computes with {actual}"
    return line
