"""Clean stops and live control of a running trainer.

Signals only set flags; the trainer acts on them at its next step boundary (and between eval
batches), where every rank takes the same decision through one small all-reduce (MAX):

- SIGTERM on any rank: save the current step and exit 0 (all ranks, the same step);
- SIGUSR1 on any rank: save the current step and go on.

Rank 0 records the job in ``OUTPUT_DIR/control.json`` (pids, host, step, state), so that
``python train.py --control status|save|stop|abort --output-dir DIR`` from another shell on the
same host can find it: ``status`` prints the record, ``save`` sends SIGUSR1 and ``stop`` SIGTERM
to rank 0 (the all-reduce carries the request to every rank), and ``abort`` sends SIGKILL to every
rank of the job on this host, saving nothing (the other ranks fail at their next collective).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .errors import RunError

CONTROL_FILE = "control.json"
ACTIONS = ("status", "save", "stop", "abort")
# states a job ends in; any other recorded state with a dead pid means it crashed or was killed
FINAL_STATES = ("finished", "stopped")
# control.json is rewritten at most this often while training (every state change is written)
_WRITE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class Request:
    """What every rank agreed to do at a step boundary."""

    save: bool = False
    stop: bool = False


class Control:
    """Stop and save requests of this process, and the job's record in ``control.json``."""

    def __init__(self) -> None:
        self._stop = False
        self._save_requests = (
            0  # a counter, so a request arriving during a poll is not lost
        )
        self._save_seen = 0
        self._previous = {}
        self._dist = None
        self._path = None
        self._record = None
        self._written_at = 0.0

    @classmethod
    def install(cls) -> "Control":
        """Install the SIGTERM and SIGUSR1 handlers (they only set flags) and return the Control."""
        ctl = cls()
        for signum, handler in (
            (signal.SIGTERM, ctl._on_stop),
            (signal.SIGUSR1, ctl._on_save),
        ):
            try:
                ctl._previous[signum] = signal.signal(signum, handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return ctl

    def _on_stop(self, signum, frame) -> None:
        self._stop = True

    def _on_save(self, signum, frame) -> None:
        self._save_requests += 1

    def attach(self, output_dir, dist, *, max_steps: int, step: int) -> None:
        """Record the job in ``OUTPUT_DIR/control.json`` (rank 0 writes; every rank gives its pid).

        A collective: every rank calls it once, before training.
        """
        self._dist = dist
        me = {
            "rank": dist.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
        }
        ranks = distributed.all_gather_object(me, dist)
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
        flags = [int(self._stop), int(save_requests > self._save_seen)]
        self._save_seen = save_requests
        if self._dist is not None and self._dist.distributed:
            agreed = torch.tensor(flags, dtype=torch.int32, device=self._dist.device)
            flags = distributed.all_reduce_max(agreed, self._dist).tolist()
        request = Request(save=bool(flags[1]), stop=bool(flags[0]))
        if request.stop and not self._stop:
            self._stop = True  # another rank was asked: this one stops too
        if self._record is not None:
            if request.stop and self._record["state"] != "stopping":
                print(f"stop requested: saving step {step}, then exiting", flush=True)
                self._update(step, "stopping", force=True)
            elif request.save:
                print(f"save requested: saving step {step}", flush=True)
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _start_time(pid: int):
    """The start time of process ``pid`` in clock ticks (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def _alive(rank: dict) -> bool:
    """Whether the process a rank recorded still runs (on this host)."""
    pid = rank["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if rank.get("start") is None or not Path("/proc").is_dir():
        return True
    return _start_time(pid) == rank["start"]  # None: a zombie, or gone meanwhile


def read_record(output_dir) -> dict:
    """The job record ``OUTPUT_DIR/control.json``; a RunError naming it when there is none."""
    path = Path(output_dir) / CONTROL_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(
            "no job has run with this output dir (no control.json): pass the running job's --output-dir",
            path=path,
        ) from None
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read the job record: {err}", path=path) from None
    if not isinstance(record, dict) or record.get("format") != "fgc-control":
        raise RunError("not a job record written by an fgc trainer", path=path)
    return record


def send(action: str, output_dir) -> None:
    """``train.py --control ACTION``: act on the job recorded in ``OUTPUT_DIR/control.json``.

    ``status`` prints the record; ``save``, ``stop`` and ``abort`` need the job to be running on
    this host, else a RunError (exit status 2).
    """
    if action not in ACTIONS:
        raise RunError(f"--control {action}: expected one of {', '.join(ACTIONS)}")
    path = Path(output_dir) / CONTROL_FILE
    record = read_record(output_dir)
    here = socket.gethostname()
    main_rank = next((r for r in record["ranks"] if r["rank"] == 0), None)
    on_this_host = record["host"] == here
    # a job that recorded its end is over, even while its process is still exiting
    running = (
        on_this_host
        and main_rank is not None
        and record["state"] not in FINAL_STATES
        and _alive(main_rank)
    )
    if action == "status":
        if running:
            alive = "running"
        elif not on_this_host:
            alive = f"unknown (the job runs on {record['host']}; this is {here})"
        elif record["state"] in FINAL_STATES:
            alive = "not running"
        else:
            alive = "not running: it exited without a clean stop (crashed or killed)"
        print(f"job: {path}")
        print(
            f"state: {record['state']} at step {record['step']} of {record['max_steps']}"
        )
        print(f"process: rank 0 is pid {record['pid']} on {record['host']}, {alive}")
        print(f"ranks: {record['world_size']}")
        print(f"started: {record['started']}, updated: {record['updated']}")
        return
    if not on_this_host:
        raise RunError(
            f"the job runs on host {record['host']}, not {here}: run --control {action} there",
            path=path,
        )
    if not running:
        raise RunError(
            f"no running job: rank 0 (pid {record['pid']}) is not running "
            f"(last recorded state: {record['state']} at step {record['step']})",
            path=path,
        )
    if action == "save":
        os.kill(record["pid"], signal.SIGUSR1)
        print(
            f"sent SIGUSR1 to rank 0 (pid {record['pid']}): every rank saves at the next step boundary and goes on"
        )
    elif action == "stop":
        os.kill(record["pid"], signal.SIGTERM)
        print(
            f"sent SIGTERM to rank 0 (pid {record['pid']}): every rank saves at the next step boundary and exits"
        )
    else:
        killed, elsewhere = [], []
        for rank in record["ranks"]:
            if rank["host"] != here:
                elsewhere.append(rank)
            elif _alive(rank):
                os.kill(rank["pid"], signal.SIGKILL)
                killed.append(rank)
        print(
            "sent SIGKILL to "
            + ", ".join(f"rank {r['rank']} (pid {r['pid']})" for r in killed)
            + "; nothing is saved"
        )
        if elsewhere:
            print(
                f"{len(elsewhere)} ranks on other hosts were not signalled: they fail at their next collective"
            )
