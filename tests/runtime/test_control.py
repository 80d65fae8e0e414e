"""fgc_runtime.control in one process: signal flags, the job record and `--control`'s errors."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from fgc_runtime import control
from fgc_runtime.distributed import DistInfo
from fgc_runtime.errors import RunError

ONE = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


@pytest.fixture
def ctl():
    ctl = control.Control.install()
    yield ctl
    ctl.finish(0)


def test_sigusr1_saves_once_and_sigterm_stops_for_good(ctl, tmp_path):
    ctl.attach(tmp_path, ONE, max_steps=10, step=0)
    assert ctl.poll(1) == control.Request(save=False, stop=False)
    os.kill(os.getpid(), signal.SIGUSR1)
    assert ctl.poll(2) == control.Request(save=True, stop=False)
    assert ctl.poll(3) == control.Request(save=False, stop=False)  # consumed
    os.kill(os.getpid(), signal.SIGTERM)
    assert ctl.poll(4) == control.Request(save=False, stop=True)
    assert ctl.poll(4).stop  # a stop stays agreed (the eval loop and the step boundary both see it)
    ctl.finish(4)
    record = json.loads((tmp_path / "control.json").read_text())
    assert record["state"] == "stopped" and record["step"] == 4 and record["max_steps"] == 10
    assert record["pid"] == os.getpid() and record["ranks"][0]["pid"] == os.getpid()
    # the handlers are restored: SIGUSR1 is no longer ours
    assert signal.getsignal(signal.SIGUSR1) is not ctl._on_save


def test_finished_job_record(ctl, tmp_path):
    ctl.attach(tmp_path, ONE, max_steps=3, step=0)
    assert json.loads((tmp_path / "control.json").read_text())["state"] == "training"
    for step in (1, 2, 3):
        ctl.poll(step)
    ctl.finish(3)
    record = json.loads((tmp_path / "control.json").read_text())
    assert (record["state"], record["step"]) == ("finished", 3)
    assert not list(tmp_path.glob(".tmp-*"))


def test_status_of_a_running_and_of_a_finished_job(ctl, tmp_path, capsys):
    ctl.attach(tmp_path, ONE, max_steps=100, step=7)
    control.send("status", tmp_path)
    out = capsys.readouterr().out
    assert "state: training at step 7 of 100" in out
    assert f"rank 0 is pid {os.getpid()} on" in out and out.splitlines()[2].endswith(", running")
    ctl.finish(9)
    control.send("status", tmp_path)
    out = capsys.readouterr().out
    assert "state: finished at step 9 of 100" in out and out.splitlines()[2].endswith(", not running")


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_record(path, **changes):
    record = {
        "format": "fgc-control", "version": 1, "pid": 1, "host": control.socket.gethostname(),
        "world_size": 1, "ranks": [], "state": "training", "step": 5, "max_steps": 10,
        "started": "2026-01-01T00:00:00Z", "updated": "2026-01-01T00:00:00Z",
    }
    record.update(changes)
    record["ranks"] = record["ranks"] or [
        {"rank": 0, "host": record["host"], "pid": record["pid"], "start": None, "cmdline": None}
    ]
    (path / "control.json").write_text(json.dumps(record))


def test_no_record_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(RunError) as info:
        control.send("stop", tmp_path / "out")
    assert str(info.value) == (
        f"{tmp_path / 'out' / 'control.json'}: error: no job has run with this output dir "
        "(no control.json): pass the running job's --output-dir"
    )


def test_a_dead_pid_is_an_error_and_gets_no_signal(tmp_path, capsys):
    pid = dead_pid()
    write_record(tmp_path, pid=pid)
    for action in ("save", "stop", "abort"):
        with pytest.raises(RunError) as info:
            control.send(action, tmp_path)
        assert f"error: no running job: rank 0 (pid {pid}) is not running" in str(info.value)
        assert "last recorded state: training at step 5" in str(info.value)
    control.send("status", tmp_path)
    assert "not running: it exited without a clean stop (crashed or killed)" in capsys.readouterr().out


def test_a_reused_pid_is_not_the_job(tmp_path):
    # this process is alive, but its recorded start time is not this process's: a reused pid
    start, cmdline = control._identity(os.getpid())
    write_record(tmp_path, pid=os.getpid(), ranks=[
        {"rank": 0, "host": control.socket.gethostname(), "pid": os.getpid(), "start": start + 1, "cmdline": cmdline}
    ])
    with pytest.raises(RunError, match=rf"rank 0 \(pid {os.getpid()}\) is not the job's process any more"):
        control.send("stop", tmp_path)


def test_a_job_on_another_host(tmp_path, capsys):
    write_record(tmp_path, host="elsewhere")
    with pytest.raises(RunError, match="the job runs on host elsewhere, not .*: run --control stop there"):
        control.send("stop", tmp_path)
    control.send("status", tmp_path)
    assert "unknown (the job runs on elsewhere" in capsys.readouterr().out


def test_a_record_that_is_not_ours(tmp_path):
    (tmp_path / "control.json").write_text("{}")
    with pytest.raises(RunError, match="not a job record written by an fgc trainer"):
        control.send("status", tmp_path)
    (tmp_path / "control.json").write_text("{")
    with pytest.raises(RunError, match="cannot read the job record"):
        control.send("status", tmp_path)


def two_rank_worker(rank, port, out_dir, results):
    import time

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from fgc_runtime import distributed

    info = distributed.init_distributed("cpu", timeout_s=3)
    ctl = control.Control.install()
    ctl.attach(out_dir, info, max_steps=10, step=0)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # a save asked of rank 1 only
    first = ctl.poll(1)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # a stop asked of rank 1 only
    second = ctl.poll(2)
    ctl.finish(2)
    # rank 1 stops taking part: rank 0's next collective fails after the 3 s timeout, not never
    error = None
    if rank == 0:
        try:
            distributed.all_reduce_sum(torch.zeros(1), info)
        except RuntimeError as err:
            error = "timed out" if "Timed out" in str(err) else str(err)
        results[0] = (first, second, error)
    else:
        while 0 not in results:  # until rank 0 has given up
            time.sleep(0.1)
        results[1] = (first, second, error)
    distributed.shutdown(info)


@pytest.mark.slow
def test_two_ranks_agree_and_a_missing_peer_times_out(tmp_path):
    import torch.multiprocessing as mp

    from test_distributed import free_port

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(two_rank_worker, args=(free_port(), tmp_path, results), nprocs=2, join=True,
                           start_method="spawn")
        results = dict(results)
    save, stop = control.Request(save=True, stop=False), control.Request(save=False, stop=True)
    assert results[0] == (save, stop, "timed out")
    assert results[1] == (save, stop, None)
    record = json.loads((tmp_path / "control.json").read_text())
    assert [r["rank"] for r in record["ranks"]] == [0, 1] and record["state"] == "stopped"
