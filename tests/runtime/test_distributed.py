"""Two gloo ranks inside pytest, without torchrun."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fgc_runtime.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_device,
    shutdown,
)
from fgc_runtime.errors import RunError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world_size, port, results):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = init_distributed("cpu")
    t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
    out = all_reduce_sum(t, info)
    barrier(info)
    results[rank] = (
        info.rank,
        info.local_rank,
        info.world_size,
        info.backend,
        info.is_main,
        info.distributed,
        str(info.device),
        out.tolist(),
        out is t,
    )
    shutdown(info)


def test_two_gloo_ranks():
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            worker,
            args=(2, free_port(), results),
            nprocs=2,
            join=True,
            start_method="spawn",
        )
        results = dict(results)
    assert results[0] == (0, 0, 2, "gloo", True, True, "cpu", [3.0, 30.0], True)
    assert results[1] == (1, 1, 2, "gloo", False, True, "cpu", [3.0, 30.0], True)


def test_single_process(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo(
        rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None
    )
    assert info.is_main and not info.distributed
    t = torch.tensor([2.0])
    assert all_reduce_sum(t, info) is t and t.item() == 2.0
    barrier(info)
    shutdown(info)
    assert not torch.distributed.is_initialized()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == (
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    if not torch.cuda.is_available():
        with pytest.raises(RunError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(RunError, match="unknown --device 'tpu'"):
        resolve_device("tpu")
