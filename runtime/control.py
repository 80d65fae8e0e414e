"""Clean stops, one run per output directory, and live control of a running trainer.

Signals only set flags; the trainer acts on them at its next step boundary (and between eval
batches), where every rank takes the same decision through one small all-reduce (MAX):

- SIGTERM on any rank: save the current step and exit 0 (all ranks, the same step);
- SIGINT (Ctrl-C) on any rank: the same, with a line saying so; a second SIGINT exits at once
  with status 130, saving nothing;
- SIGUSR1 on any rank: save the current step and go on.

Rank 0 locks the output directory for the run (``OUTPUT_DIR/.fgc-lock``, an ``flock`` that
ends with the process), so a second run into it is refused instead of interleaving with it.

Rank 0 records the job in ``OUTPUT_DIR/control.json`` (pids, start times, command lines, host,
step, state), so that ``python train.py --control status|save|stop|abort --output-dir DIR``
from another shell on the same host can find it: ``status`` prints the record, ``save`` sends
SIGUSR1 and ``stop`` SIGTERM to rank 0 (the all-reduce carries the request to every rank), and
``abort`` sends SIGKILL to every rank of the job on this host, saving nothing (the other ranks
fail at their next collective). A process is signalled only when its pid is positive and its
start time and command line, read from ``/proc``, are those of the record.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .errors import RunError

CONTROL_FILE = "control.json"
LOCK_FILE = ".fgc-lock"
ACTIONS = ("status", "save", "stop", "abort")
STATES = ("training", "stopping", "stopped", "finished")
# states a job ends in; any other recorded state with a dead pid means it crashed or was killed
FINAL_STATES = ("finished", "stopped")
# control.json is rewritten at most this often while training (every state change is written)
_WRITE_INTERVAL_S = 1.0
# where process start times and command lines are read (a module constant so tests can move it)
_PROC = Path("/proc")
# the largest pid Linux gives (PID_MAX_LIMIT); a larger number is not a process id
_MAX_PID = 2**22
# the exit status of a process stopped by Ctrl-C (128 + SIGINT), as shells report it
INTERRUPTED_STATUS = 130


@dataclass(frozen=True)
class Request:
    """What every rank agreed to do at a step boundary."""

    save: bool = False
    stop: bool = False


class Control:
    """Stop and save requests of this process, and the job's record in ``control.json``."""

    def __init__(self) -> None:
        self._stop = False
        self._interrupted = False
        self._save_requests = (
            0  # a counter, so a request arriving during a poll is not lost
        )
        self._save_seen = 0
        self._previous = {}
        self._dist = None
        self._path = None
        self._record = None
        self._written_at = 0.0
        self._lock = None

    @classmethod
    def install(cls) -> "Control":
        """Install the SIGTERM, SIGINT and SIGUSR1 handlers (they only set flags) and return the
        Control. A SIGINT that was ignored when the process started stays ignored."""
        ctl = cls()
        handlers = [(signal.SIGTERM, ctl._on_stop), (signal.SIGUSR1, ctl._on_save)]
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            handlers.append((signal.SIGINT, ctl._on_interrupt))
        for signum, handler in handlers:
            try:
                ctl._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return ctl

    def _on_stop(self, signum, frame) -> None:
        self._stop = True

    def _on_save(self, signum, frame) -> None:
        self._save_requests += 1

    def _on_interrupt(self, signum, frame) -> None:
        if self._interrupted:
            # The second Ctrl-C: stop now, wherever this process is. os._exit, not an exception:
            # unwinding could run collectives or saves that wait for ranks that are gone.
            if _rank() == 0:
                os.write(2, b"interrupted again: exiting at once, without saving\n")
            os._exit(INTERRUPTED_STATUS)
        self._interrupted = True
        self._stop = True

    def lock_output_dir(self, output_dir, dist) -> None:
        """Take the output directory for this run: rank 0 holds ``OUTPUT_DIR/.fgc-lock`` until
        this process exits. A collective: every rank calls it, before anything in the output dir
        is read or written.

        When another live process holds it, every rank raises a RunError (rank 0's names the
        holder; the others exit with status 2 without a line of their own). A lock left by a
        process that died is no lock: the kernel drops it with the process.
        """
        error = None
        if dist.is_main:
            try:
                self._lock = _take_lock(Path(output_dir))
            except RunError as err:
                error = err
        if dist.distributed:
            refused = torch.tensor([int(error is not None)], dtype=torch.int32, device=dist.device)
            distributed.all_reduce_max(refused, dist)  # rank 0's answer reaches every rank
            if error is None and refused.item():
                raise RunError("the output dir is in use (rank 0 says by whom)", quiet=True)
        if error is not None:
            raise error

    def attach(self, output_dir, dist, *, max_steps: int, step: int) -> None:
        """Record the job in ``OUTPUT_DIR/control.json`` (rank 0 writes; every rank gives its
        pid, start time and command line).

        A collective: every rank calls it once, before training.
        """
        self._dist = dist
        pid = os.getpid()
        identity = _identity(pid)
        me = {
            "rank": dist.rank,
            "host": socket.gethostname(),
            "pid": pid,
            "start": None if identity is None else identity[0],
            "cmdline": None if identity is None else identity[1],
        }
        ranks = distributed.all_gather_json(me, dist)
        if not dist.is_main:
            return
        self._path = Path(output_dir) / CONTROL_FILE
        now = _now()
        self._record = {
            "format": "fgc-control",
            "version": 1,
            "pid": me["pid"],
            "host": me["host"],
            "world_size": dist.world_size,
            "ranks": ranks,
            "state": "training",
            "step": step,
            "max_steps": max_steps,
            "started": now,
            "updated": now,
        }
        self._write()

    def poll(self, step: int) -> Request:
        """The requests of all ranks since the last poll, agreed by all ranks (a collective).

        A stop, once agreed, stays agreed; a save request is consumed by the poll that agrees it.
        """
        save_requests = self._save_requests
        flags = [int(self._stop), int(save_requests > self._save_seen), int(self._interrupted)]
        self._save_seen = save_requests
        if self._dist is not None and self._dist.distributed:
            agreed = torch.tensor(flags, dtype=torch.int32, device=self._dist.device)
            flags = distributed.all_reduce_max(agreed, self._dist).tolist()
        request = Request(save=bool(flags[1]), stop=bool(flags[0]))
        if request.stop and not self._stop:
            self._stop = True  # another rank was asked: this one stops too
        if self._record is not None:
            if request.stop and self._record["state"] != "stopping":
                if flags[2]:
                    _announce(f"interrupted: saving step {step}, then exiting (Ctrl-C again to stop at once)")
                else:
                    _announce(f"stop requested: saving step {step}, then exiting")
                self._update(step, "stopping", force=True)
            elif request.save:
                _announce(f"save requested: saving step {step}")
                self._update(step, self._record["state"], force=True)
            else:
                self._update(step, self._record["state"])
        return request

    def finish(self, step: int) -> None:
        """Record the end of the job (``stopped`` or ``finished``) and restore the signal handlers."""
        if self._record is not None:
            self._update(step, "stopped" if self._stop else "finished", force=True)
        for signum, previous in self._previous.items():
            try:
                signal.signal(signum, previous)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def _update(self, step: int, state: str, force: bool = False) -> None:
        self._record["step"] = step
        changed = state != self._record["state"]
        self._record["state"] = state
        if force or changed or time.monotonic() - self._written_at >= _WRITE_INTERVAL_S:
            self._record["updated"] = _now()
            self._write()

    def _write(self) -> None:
        # atomic: a reader sees the old record or the new one, never half of one
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(f".tmp-{CONTROL_FILE}")
        tmp.write_text(json.dumps(self._record, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self._path)
        self._written_at = time.monotonic()


def _announce(message: str) -> None:
    """MESSAGE on a line of its own: on a terminal, in place of the progress bar's line."""
    clear = "\r\x1b[K" if getattr(sys.stdout, "isatty", lambda: False)() else ""
    print(clear + message, flush=True)


def _rank() -> int:
    """This process's rank as torchrun gave it (0 outside torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _printable(text: str) -> str:
    """TEXT on one line: control characters (a newline in an argument) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ---- the output directory's lock ------------------------------------------------------------


def _take_lock(output_dir: Path):
    """Lock OUTPUT_DIR/.fgc-lock for this process and write who holds it; the open file, which
    holds the lock until it is closed (at exit at the latest). A RunError naming the holder when
    another process has it."""
    path = output_dir / LOCK_FILE
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # never truncated before the lock is ours: the holder's record stays readable
        lock = open(path, "a+b")
    except OSError as err:
        raise RunError(f"cannot lock the output directory: {err.strerror}", path=output_dir) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read(65536)
        lock.close()
        raise RunError(_in_use_message(holder), path=output_dir) from None
    except OSError as err:
        # a filesystem without locks (some network mounts): run, but say what is not guarded
        print(
            f"warning: {output_dir}: cannot lock the output directory ({err.strerror}): "
            "a second run into it would not be refused",
            file=sys.stderr,
            flush=True,
        )
        return lock
    identity = _identity(os.getpid())
    command = identity[1] if identity is not None else [sys.executable, *sys.argv]
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now(), "command": command}
    lock.seek(0)
    lock.truncate()
    lock.write((json.dumps(holder) + "\n").encode("utf-8", "surrogateescape"))
    lock.flush()
    return lock


def _in_use_message(raw: bytes) -> str:
    """The line that refuses a second run, naming the holder its lock file records."""
    try:
        holder = json.loads(raw.decode("utf-8", "surrogateescape"))
        pid, host, since, command = holder["pid"], holder["host"], holder["since"], holder["command"]
        who = f"pid {int(pid)} on {_printable(str(host))} since {_printable(str(since))}"
        who += f" ({_printable(shlex.join(map(str, command)))})"
    except (ValueError, KeyError, TypeError):
        who = "another process (its lock file does not say which yet)"
    return f"the output dir is in use by {who}: wait for it to finish, or use another --output-dir"


# ---- processes ------------------------------------------------------------------------------


def _identity(pid: int):
    """``(start time in clock ticks, command line)`` of process PID, read from /proc; None when
    there is no such process, it is a zombie, or /proc is missing. The pair tells a process
    apart from a later one given the same pid."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    args = [a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")]
    if args and args[-1] == "":
        args.pop()
    return int(fields[19]), args


def _exists(pid: int) -> bool:
    """Whether a process PID exists (without /proc; any process, not only the job's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _is_job_process(rank: dict):
    """True when the rank's process still runs (its start time and command line are those of
    the record), False when it is gone, and a string saying why not when its pid now belongs to
    another process. Without /proc, whether the pid exists."""
    if not _PROC.is_dir():
        return _exists(rank["pid"])
    identity = _identity(rank["pid"])
    if identity is None:
        return False
    if rank["start"] is None or rank["cmdline"] is None:
        return (
            f"rank {rank['rank']} (pid {rank['pid']}) cannot be checked: "
            "the job recorded no start time or command line"
        )
    if identity != (rank["start"], rank["cmdline"]):
        return f"rank {rank['rank']} (pid {rank['pid']}) is not the job's process any more"
    return True


def _pin(pid: int):
    """A pidfd for PID (it keeps naming that process even if its pid is given to another
    later), or None where the system has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _signal_pinned(pid: int, fd, signum: int) -> None:
    if fd is not None:
        signal.pidfd_send_signal(fd, signum)
    else:
        os.kill(pid, signum)


# ---- control.json and --control -------------------------------------------------------------


def _check_record(record, path) -> dict:
    """RECORD, checked field by field (types and ranges); a RunError naming the first wrong one.

    Everything later signalled or printed comes from here, so a hostile or damaged file cannot
    make --control signal a pid such as -1 (every process of the user) or 0 (its group).
    """

    def fail(what: str):
        raise RunError(f"not a valid job record: {what}", path=path)

    def whole(value, name: str, low: int, high: int | None = None) -> int:
        if type(value) is not int or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            fail(f"{name} is {json.dumps(value)}, expected a whole number {bound}")
        return value

    def text(value, name: str) -> str:
        if not isinstance(value, str) or not value:
            fail(f"{name} is {json.dumps(value)}, expected a non-empty string")
        return value

    def fields(obj, name: str, expected: tuple) -> None:
        if not isinstance(obj, dict):
            fail(f"{name} is not an object")
        for key in expected:
            if key not in obj:
                fail(f"{name} has no {key!r}")
        unknown = sorted(set(obj) - set(expected))
        if unknown:
            fail(f"{name} has an unknown field {unknown[0]!r}")

    if not isinstance(record, dict) or record.get("format") != "fgc-control":
        raise RunError("not a job record written by an fgc trainer", path=path)
    top = (
        "format", "version", "pid", "host", "world_size", "ranks", "state", "step", "max_steps", "started", "updated",
    )
    fields(record, "the record", top)
    if record["version"] != 1 or type(record["version"]) is not int:
        fail(f"version is {json.dumps(record['version'])}, expected 1")
    whole(record["pid"], "pid", 1, _MAX_PID)
    text(record["host"], "host")
    world_size = whole(record["world_size"], "world_size", 1)
    if record["state"] not in STATES:
        fail(f"state is {json.dumps(record['state'])}, expected one of {', '.join(STATES)}")
    whole(record["step"], "step", 0)
    whole(record["max_steps"], "max_steps", 0)
    text(record["started"], "started")
    text(record["updated"], "updated")
    ranks = record["ranks"]
    if not isinstance(ranks, list) or len(ranks) != world_size:
        fail(f"ranks is not a list of world_size ({world_size}) entries")
    seen = set()
    for i, rank in enumerate(ranks):
        name = f"ranks[{i}]"
        fields(rank, name, ("rank", "host", "pid", "start", "cmdline"))
        number = whole(rank["rank"], f"{name}.rank", 0, world_size - 1)
        if number in seen:
            fail(f"rank {number} appears twice in ranks")
        seen.add(number)
        text(rank["host"], f"{name}.host")
        whole(rank["pid"], f"{name}.pid", 1, _MAX_PID)
        if rank["start"] is not None:
            whole(rank["start"], f"{name}.start", 0)
        cmdline = rank["cmdline"]
        if cmdline is not None and (
            not isinstance(cmdline, list) or not cmdline or not all(isinstance(a, str) for a in cmdline)
        ):
            fail(f"{name}.cmdline is not a list of strings")
    main = next(r for r in ranks if r["rank"] == 0)
    if (main["pid"], main["host"]) != (record["pid"], record["host"]):
        fail(f"pid {record['pid']} on {record['host']} is not rank 0's (pid {main['pid']} on {main['host']})")
    return record


def read_record(output_dir) -> dict:
    """The job record ``OUTPUT_DIR/control.json``, checked; a RunError naming it when there is
    none or it is malformed."""
    path = Path(output_dir) / CONTROL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(
            "no job has run with this output dir (no control.json): pass the running job's --output-dir",
            path=path,
        ) from None
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read the job record: {_printable(str(err))}", path=path) from None
    return _check_record(record, path)


def send(action: str, output_dir) -> None:
    """``train.py --control ACTION``: act on the job recorded in ``OUTPUT_DIR/control.json``.

    ``status`` prints the record; ``save``, ``stop`` and ``abort`` need the job to be running on
    this host, and /proc to check that each process to signal is still the job's (its start time
    and command line), else a RunError (exit status 2) and nothing is signalled.
    """
    if action not in ACTIONS:
        raise RunError(f"--control {action}: expected one of {', '.join(ACTIONS)}")
    path = Path(output_dir) / CONTROL_FILE
    record = read_record(output_dir)
    here = socket.gethostname()
    main_rank = next(r for r in record["ranks"] if r["rank"] == 0)
    on_this_host = record["host"] == here
    # a job that recorded its end is over, even while its process is still exiting
    ended = record["state"] in FINAL_STATES
    found = _is_job_process(main_rank) if on_this_host and not ended else False
    running = found is True
    host, pid = _printable(record["host"]), record["pid"]
    if action == "status":
        if running:
            alive = "running"
        elif not on_this_host:
            alive = f"unknown (the job runs on {host}; this is {_printable(here)})"
        elif ended:
            alive = "not running"
        else:
            alive = "not running: it exited without a clean stop (crashed or killed)"
        print(f"job: {path}")
        print(f"state: {record['state']} at step {record['step']} of {record['max_steps']}")
        print(f"process: rank 0 is pid {pid} on {host}, {alive}")
        print(f"ranks: {record['world_size']}")
        print(f"started: {_printable(record['started'])}, updated: {_printable(record['updated'])}")
        return
    if not on_this_host:
        raise RunError(f"the job runs on host {host}, not {_printable(here)}: run --control {action} there", path=path)
    if not _PROC.is_dir():
        raise RunError(
            f"--control {action} checks through /proc that rank 0 (pid {pid}) is still the job's process, "
            "and this system has no /proc: nothing was signalled",
            path=path,
        )
    local = [r for r in record["ranks"] if r["host"] == here] if action == "abort" else [main_rank]
    # pinned first, checked second, signalled last: a pid given to another process in between
    # is not signalled
    pinned = {r["rank"]: _pin(r["pid"]) for r in local}
    try:
        found = _is_job_process(main_rank) if not ended else False
        if isinstance(found, str):
            raise RunError(f"{found}: nothing was signalled", path=path)
        if found is not True:
            raise RunError(
                f"no running job: rank 0 (pid {pid}) is not running "
                f"(last recorded state: {record['state']} at step {record['step']})",
                path=path,
            )
        targets = []
        for rank in local:
            found = _is_job_process(rank)
            if isinstance(found, str):
                raise RunError(f"{found}: nothing was signalled", path=path)
            if found is True:
                targets.append(rank)
        signum = {"save": signal.SIGUSR1, "stop": signal.SIGTERM, "abort": signal.SIGKILL}[action]
        sent = []
        for rank in targets:
            try:
                _signal_pinned(rank["pid"], pinned[rank["rank"]], signum)
            except ProcessLookupError:
                continue  # it exited since the check
            sent.append(rank)
    finally:
        for fd in pinned.values():
            if fd is not None:
                os.close(fd)
    if action != "abort" and not sent:
        raise RunError(f"no running job: rank 0 (pid {pid}) exited just now", path=path)
    if action == "save":
        print(f"sent SIGUSR1 to rank 0 (pid {pid}): every rank saves at the next step boundary and goes on")
    elif action == "stop":
        print(f"sent SIGTERM to rank 0 (pid {pid}): every rank saves at the next step boundary and exits")
    else:
        print("sent SIGKILL to " + ", ".join(f"rank {r['rank']} (pid {r['pid']})" for r in sent) + "; nothing is saved")
        elsewhere = len(record["ranks"]) - len(local)
        if elsewhere:
            print(f"{elsewhere} ranks on other hosts were not signalled: they fail at their next collective")
