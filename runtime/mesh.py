"""The device mesh of a run, from the parallel degrees its plan fixed.

A plan names its mesh as ``(dimension, degree)`` pairs, outermost first, from these dimensions:

- ``diloco``: DiLoCo workers, which train alone and average their parameters' change every few
  steps (``fgc_runtime.diloco``); each worker is the ranks of the dimensions after it;
- ``dp_replicate``: copies of the model that average their gradients (FSDP2's hybrid sharding,
  HSDP: each copy sharded over ``dp_shard``);
- ``dp_shard``: ranks FSDP2 shards parameters, gradients and optimizer state over;
- ``dp``: data-parallel replicas whose gradients are summed after the backward (DDP with tensor
  parallelism, and the pipeline trainer's replicas);
- ``pp``: the ranks of one pipeline, each holding some of its stages;
- ``tp``: neighbouring ranks that split each decoder layer's projections (tensor parallelism).

Data parallelism is every ``dp*`` dimension together: the ranks that read different batches. The
ranks of one tensor-parallel group read the same batch.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from .errors import RunError

DATA_DIMS = ("diloco", "dp_replicate", "dp_shard", "dp")


class Mesh:
    """The ranks of a run laid out on the plan's dimensions.

    ``dp_group``, ``dp_rank``, ``dp_size``: the data-parallel group of this rank (the ranks that
    read different batches and hold the same pipeline stages and tensor-parallel share); ``tp``:
    the tensor-parallel sub-mesh (None without tensor parallelism), ``tp_rank`` this rank's place
    in it; ``pp_group``, ``pp_rank``: the pipeline of this rank (None, 0 without one); ``fsdp``:
    the sub-mesh FSDP2 shards over (2-D ``("dp_replicate", "dp_shard")`` for HSDP; None without
    FSDP2); ``first_copy``: whether this rank holds the first data-parallel copy of its share and
    is the first of its tensor-parallel group (the rank whose share a gathered checkpoint takes);
    ``worker_group``, ``outer_group``: with DiLoCo, the data-parallel ranks of this rank's worker
    (None when there is one) and the ranks in the same place of every worker (None without
    DiLoCo); ``worker_all_group``: with DiLoCo around pipelines, every rank of this rank's worker.
    """

    def __init__(self, device: torch.device, dims: dict[str, int]):
        from torch.distributed.device_mesh import init_device_mesh

        world = torch.distributed.get_world_size()
        if math.prod(dims.values()) != world:
            shape = " x ".join(f"{name} {size}" for name, size in dims.items())
            raise RunError(
                f"this package runs on a mesh of {math.prod(dims.values())} ranks ({shape}), "
                f"not {world}: launch it with `torchrun --nproc-per-node {math.prod(dims.values())} train.py`"
            )
        # DTensor warns that gathering a shard of two dimensions (checkpoints gather full state
        # dicts) takes two all-gathers: expected here, and not the user's concern
        logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        self.dims = dict(dims)
        self.device_mesh = init_device_mesh(device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))
        data = tuple(name for name in dims if name in DATA_DIMS)
        if len(data) == 1:
            dp = self.device_mesh[data[0]]
        else:  # HSDP: the replicate and shard dimensions together read different batches
            dp = self.device_mesh[data]._flatten("dp_all")
        self.dp_group, self.dp_rank, self.dp_size = dp.get_group(), dp.get_local_rank(), dp.size()
        self.tp = self.device_mesh["tp"] if "tp" in dims else None
        self.tp_rank = self.tp.get_local_rank() if self.tp is not None else 0
        self.pp_group = self.device_mesh.get_group("pp") if "pp" in dims else None
        self.pp_rank = self.device_mesh.get_local_rank("pp") if "pp" in dims else 0
        self.first_copy = self.dp_rank == 0 and self.tp_rank == 0
        # DiLoCo: the ranks of this rank's worker (None when a worker is one rank), and this
        # rank's peers in the other workers, which sync with it
        inner = tuple(name for name in ("dp_replicate", "dp", "dp_shard") if name in dims)
        self.worker_group = None
        if "diloco" in dims and inner:  # with HSDP inside the worker, its copies and shards together
            worker = self.device_mesh[inner[0]] if len(inner) == 1 else self.device_mesh[inner]._flatten("worker_dp")
            self.worker_group = worker.get_group()
        self.outer_group = self.device_mesh.get_group("diloco") if "diloco" in dims else None
        # DiLoCo workers of pipelines: every rank of this rank's worker (its pipelines' losses are
        # summed over them)
        self.worker_all_group = None
        if "diloco" in dims and "pp" in dims:
            rest = tuple(name for name in dims if name != "diloco")
            self.worker_all_group = self.device_mesh[rest]._flatten("worker_all").get_group()
        shard = tuple(name for name in ("dp_replicate", "dp_shard") if name in dims)
        self.fsdp = None if not shard else self.device_mesh[shard if len(shard) > 1 else shard[0]]

    def describe(self) -> str:
        """One line: the dimensions and their degrees, outermost first."""
        return " x ".join(f"{name} {size}" for name, size in self.dims.items())


def average_grads(model: torch.nn.Module, group) -> None:
    """Average MODEL's gradients over GROUP (the data-parallel replicas), as DDP does. A
    tensor-parallel gradient (a DTensor) is averaged shard by shard: each rank of a replica holds
    its own share, and the ranks of GROUP hold the same share."""
    from torch.distributed.tensor import DTensor

    size = torch.distributed.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            torch.distributed.all_reduce(grad, group=group)
            grad.div_(size)


class Layout(NamedTuple):
    """How a run's ranks share its batches (what :func:`layout` gives): ``mesh``, the plan's
    :class:`Mesh` (None when the ranks form one data-parallel dimension, or there is one rank);
    ``dp_rank`` and ``dp_size``, this rank's place among the ranks that read different batches;
    ``grad_accum_steps``, the forwards and backwards of a step on this rank (1 for a pipeline,
    whose schedule cuts its share of the batch into the plan's micro-batches itself, as the
    plan's ``grad_accum_steps`` says)."""

    mesh: Mesh | None
    dp_rank: int
    dp_size: int
    grad_accum_steps: int


def layout(plan: dict, dist) -> Layout:
    """The ranks of DIST laid out as PLAN (train.py's ``PLAN``) says, checked against the way the
    run was launched: a one-process package refuses several ranks, a mesh of several dimensions
    or a pipeline refuses one, and the global batch must split into the data-parallel ranks'
    micro-batches (a RunError saying which, on every rank)."""
    dims, nproc, batch = plan["mesh"], plan["nproc"], plan["global_batch_size"]
    if plan["trainer_type"] == "basic" and dist.world_size > 1:
        raise RunError(
            "this package was built for the basic trainer (one process): run `python train.py`, "
            "or rebuild with -D trainer_type=ddp"
        )
    pipeline = plan["pipeline"]
    mesh = None
    if pipeline is not None or len(dims) > 1:
        if not dist.distributed:
            what = f"a pipeline over {dims['pp']} ranks" if pipeline is not None else f"on a mesh of {nproc} ranks"
            raise RunError(f"this package runs {what}: launch it with `torchrun --nproc-per-node {nproc} train.py`")
        mesh = Mesh(dist.device, dims)
        dp_rank, dp_size = mesh.dp_rank, mesh.dp_size
    else:  # one data-parallel dimension (or one process): every rank reads its own batches
        dp_rank, dp_size = dist.rank, dist.world_size
    if pipeline is not None:
        micro, what = pipeline["microbatches"], f"{dp_size} pipelines of {pipeline['microbatches']} micro-batches"
        if batch % (dp_size * micro):
            raise RunError(f"the global batch {batch} does not split into {what}")
        return Layout(mesh, dp_rank, dp_size, 1)
    micro = plan["micro_batch_size"]
    if batch % (dp_size * micro):
        raise RunError(
            f"the global batch {batch} does not split into {dp_size} data-parallel ranks of micro-batches of {micro}"
        )
    return Layout(mesh, dp_rank, dp_size, batch // (dp_size * micro))
