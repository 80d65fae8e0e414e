"""Process-group setup for trainers launched by ``torchrun`` or as a single ``python`` process.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them the trainer runs as one process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import RunError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job, and the device it trains on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes shared files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """Turn a ``--device`` value (``auto``, ``cpu`` or ``cuda``) into a device.

    ``auto`` picks CUDA when it is available; asking for ``cuda`` without one is a RunError.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                "--device cuda was asked for, but no CUDA device is available"
            )
        return torch.device("cuda")
    raise RunError(f"unknown --device {name!r}: expected auto, cpu or cuda")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RunError(
            f"environment variable {name}={value!r} is not an integer"
        ) from None


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Read the torchrun environment and, with more than one process, start the process group.

    The backend is gloo on CPU and nccl on CUDA; on CUDA each process uses ``cuda:LOCAL_RANK``.
    A single process gets no process group at all, so collectives become no-ops. ``timeout_s``
    bounds how long a collective waits for the other ranks before it fails (torch's default
    when None), so a rank that hangs brings the job down instead of stalling it forever.
    """
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    dev = resolve_device(device)
    if world_size <= 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, backend=None)

    if dev.type == "cuda":
        # Bind the device before creating the group so nccl uses the right GPU.
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, timeout=timeout
        )
    return DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        device=dev,
        backend=backend,
    )


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks in place and return it; a no-op for a single process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj, info: DistInfo) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects); ``[obj]`` for a single process."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Take the maximum of ``t`` over all ranks in place and return it; a no-op for one process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier(info: DistInfo) -> None:
    """Wait for every rank; a no-op for a single process."""
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo | None = None) -> None:
    """Destroy the process group if one was created (safe to call twice)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
