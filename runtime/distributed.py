"""Process-group setup for trainers launched by ``torchrun`` or as a single ``python`` process.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them the trainer runs as one process and no process group is created.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import pickle
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
    _object_transport_without_numpy()
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


def _object_transport_without_numpy() -> None:
    """Let torch's own object collectives work where numpy is missing (a package needs torch only).

    The runtime sends no Python object through them (see :func:`all_gather_json`), but torch
    does: the pipeline stages exchange their tensor shapes with ``send_object_list`` and
    ``recv_object_list``, and torch turns the received bytes back into objects with
    ``tensor.numpy()``. Without numpy, that one step is replaced by a copy of the bytes.
    """
    try:
        torch.zeros(1).numpy()
        return  # numpy works: torch's code as it is
    except RuntimeError:
        pass
    c10d = dist.distributed_c10d
    original = getattr(c10d, "_tensor_to_object", None)
    if original is None or getattr(original, "_fgc_without_numpy", False):
        return
    unpickler = getattr(c10d, "_unpickler", pickle.Unpickler)

    def _tensor_to_object(tensor, tensor_size, *args, **kwargs):
        # the objects torch sends between its own ranks, as torch itself would read them
        return unpickler(io.BytesIO(_tensor_bytes(tensor.reshape(-1), int(tensor_size)))).load()

    _tensor_to_object._fgc_without_numpy = True
    c10d._tensor_to_object = _tensor_to_object


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over all ranks in place and return it; a no-op for a single process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_json(value, info: DistInfo) -> list:
    """``[value of rank 0, value of rank 1, ...]`` for a JSON value (tuples come back as lists);
    ``[value]`` for a single process.

    torch's ``all_gather_object`` would do, but it turns the bytes back into objects through
    numpy, which a package does not require (and it unpickles what the other ranks send).
    """
    if not info.distributed:
        return [value]
    data = json.dumps(value, sort_keys=True).encode("utf-8")
    return [json.loads(raw) for raw in _gather_bytes(data, info.device, dst=None)]


def broadcast_json(value, info: DistInfo):
    """Rank 0's VALUE (JSON data) on every rank: its length, then its bytes, as tensors on the
    trainer's device (torch's ``broadcast_object_list`` would unpickle, and needs numpy). Every
    rank calls it; the others' VALUE is ignored."""
    if not info.distributed:
        return value
    data = json.dumps(value).encode("utf-8") if info.is_main else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=info.device)
    dist.broadcast(length, src=0)
    buf = torch.zeros(int(length.item()), dtype=torch.uint8, device=info.device)
    if info.is_main and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(_tensor_bytes(buf, len(buf)).decode("utf-8"))


def gather_tensors(obj, device: torch.device, dst: int = 0):
    """On rank DST, ``[obj of rank 0, obj of rank 1, ...]`` over the default process group;
    None on the other ranks. OBJ is made of tensors, numbers, strings, None, lists, tuples and
    dicts (a state dict); tensors arrive on the CPU. DEVICE holds the bytes in transit (the CPU
    for gloo, this rank's GPU for nccl). Every rank must call it.

    The objects travel as ``torch.save`` bytes and are read with ``torch.load(weights_only=True)``:
    no numpy (which torch's ``gather_object`` needs) and no unpickling of code.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    gathered = _gather_bytes(buffer.getvalue(), device, dst=dst)
    if gathered is None:
        return None
    return [torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True) for raw in gathered]


def _gather_bytes(data: bytes, device: torch.device, dst: int | None) -> list[bytes] | None:
    """Every rank's DATA, on rank DST (None elsewhere), or on every rank when DST is None.

    Two collectives: the lengths, then the bytes, each rank's padded to the longest.
    """
    world_size = dist.get_world_size()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world_size)]
    dist.all_gather(lengths, length)
    lengths = [int(n.item()) for n in lengths]
    # at least one byte: a collective of empty tensors is not supported by every backend
    padded = torch.zeros(max(max(lengths), 1), dtype=torch.uint8, device=device)
    if data:
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    if dst is None:
        out = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(out, padded)
    else:
        mine = dist.get_rank() == dst
        out = [torch.empty_like(padded) for _ in range(world_size)] if mine else None
        dist.gather(padded, out, dst=dst)
        if not mine:
            return None
    return [_tensor_bytes(t, n) for t, n in zip(out, lengths)]


def _tensor_bytes(t: torch.Tensor, n: int) -> bytes:
    """The first N bytes of a uint8 tensor (copied to the CPU)."""
    t = t[:n].cpu().contiguous()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


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
