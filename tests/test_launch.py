"""launch.sh of a torchrun package: the command it runs, its errors, a clean stop, and a 2-node
launch simulated on this machine (two torchrun processes meeting at a c10d rendezvous on localhost)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLE, run_fgc

# launch.sh runs `torchrun`: the one installed beside this Python
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
SAFETY_TIMEOUT_S = 900  # against a hang; no assertion is made on time


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch") / "ddp"
    run_fgc("build", EXAMPLE, "-o", out, "-D", "max_steps=6", "-D", "eval_every=0", check=True)
    return out


def launch(pkg: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(pkg / "launch.sh"), *map(str, args)], cwd=cwd or pkg, capture_output=True, text=True, env=ENV,
        timeout=SAFETY_TIMEOUT_S,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_dry_run_prints_the_command(ddp):
    train = ddp / "train.py"
    proc = launch(ddp, "--dry-run")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"torchrun --nproc-per-node 2 {train}\n", "")
    proc = launch(ddp, "--dry-run", "--devices", "0,1,3", "--shutdown-timeout", "90", "--", "--max-steps", "5",
                  "--output-dir", "my run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"CUDA_VISIBLE_DEVICES=0,1,3 torchrun --nproc-per-node 3 --shutdown-timeout 90 {train} "
        "--max-steps 5 --output-dir my\\ run\n"
    )


def test_dry_run_multi_node(ddp):
    train = ddp / "train.py"
    proc = launch(ddp, "--dry-run", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint=node0:29400",
                  "--rdzv-id", "job7")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        "torchrun --nproc-per-node 2 --nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 --rdzv-id job7 "
        f"--rdzv-backend c10d {train}\n"
    )
    proc = launch(ddp, "--dry-run", "--nnodes", "2", "--rdzv-endpoint", "node0:29400", "--rdzv-backend", "static")
    assert proc.stdout.count("--rdzv-backend") == 1 and "--rdzv-backend static" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nnodes", "2", "--node-rank", "0"],
         "--nnodes 2 needs --rdzv-endpoint HOST:PORT (an address of the first node that every node can reach)"),
        (["--nnodes=1:4"],
         "--nnodes 1:4 needs --rdzv-endpoint HOST:PORT (an address of the first node that every node can reach)"),
        (["--devices", "0,x"], "--devices 0,x: expected GPU indices separated by commas, e.g. 0,1,3"),
        (["--devices"], "--devices needs a value"),
        (["--rdzv-endpoint", "--", "--max-steps", "3"], "--rdzv-endpoint needs a value"),
    ],
)
def test_launch_errors_name_the_flag(ddp, args, message):
    proc = launch(ddp, "--dry-run", *args)
    assert proc.returncode == 2
    assert proc.stderr == f"launch.sh: error: {message}\n"
    assert proc.stdout == ""


@pytest.mark.slow
def test_sigterm_to_launch_sh_stops_cleanly(ddp, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [str(ddp / "launch.sh"), "--", "--output-dir", str(run), "--log-every", "1", "--max-steps", "100000"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
    )
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 2 |"):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=SAFETY_TIMEOUT_S) == 0, "".join(output)[-3000:]
    record = json.loads((run / "control.json").read_text())
    assert record["state"] == "stopped"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{record['step']:08d}"


@pytest.mark.slow
def test_two_nodes_on_localhost_train_like_one_node(ddp, tmp_path):
    """Two launch.sh (one process each) meet at a c10d rendezvous: the same 2 ranks, the same losses."""
    one = launch(ddp, "--", "--output-dir", tmp_path / "one-node", "--log-every", "1", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    endpoint = f"localhost:{free_port()}"
    nodes = [
        subprocess.Popen(
            [str(ddp / "launch.sh"), "--nproc-per-node", "1", "--nnodes", "2", "--node-rank", str(rank),
             "--rdzv-endpoint", endpoint, "--rdzv-id", "fgc-test", "--",
             "--output-dir", str(tmp_path / "two-nodes"), "--log-every", "1"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=SAFETY_TIMEOUT_S)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    record = json.loads((tmp_path / "two-nodes" / "control.json").read_text())
    assert record["world_size"] == 2 and record["state"] == "finished"
    assert len(losses(tmp_path / "one-node")) == 6
    assert losses(tmp_path / "two-nodes") == losses(tmp_path / "one-node")
