"""A decision of the plan-training pass: DiLoCo's outer loop. The workers the ranks form, the
outer optimizer, and the mesh dimensions of the workers."""

from __future__ import annotations

from fgc.settings import DiLoCoTrainer, FSDPSettings


def diloco_plan(s: DiLoCoTrainer, err) -> dict | None:
    """Check the DiLoCo settings; the plan's ``diloco`` entry (None after an error)."""
    d = s.diloco
    if s.precision.mode == "fp16-mixed":
        err("precision.mode", "fp16-mixed is not supported with DiLoCo in this version: each worker "
            "would need its own gradient scaler in the checkpoint", hint="use bf16-mixed")
        return None
    workers = s.nproc if d.workers is None else d.workers
    if s.nproc % workers:
        err(
            "diloco.workers",
            f"nproc {s.nproc} does not split into {workers} DiLoCo workers: each worker is "
            "nproc / workers ranks",
            hint=f"set workers to a divisor of {s.nproc}",
        )
        return None
    ranks = s.nproc // workers
    # FSDPSettings as the parallel settings: each worker shards its copy over its ranks
    sharded = isinstance(s.parallel, FSDPSettings)
    if sharded and ranks == 1:
        err(
            "parallel",
            f"FSDP2 inside DiLoCo workers needs workers of 2 or more ranks: {workers} workers of nproc "
            f"{s.nproc} are one rank each",
            hint=f"set diloco_workers to a divisor of {s.nproc} below it, or do not shard (diloco_fsdp: false)",
        )
        return None
    return {
        "workers": workers,
        "ranks_per_worker": ranks,
        # what a worker of several ranks runs over them: DDP, or FSDP2 (sharding its copy)
        "inner": "fsdp2" if sharded else ("ddp" if ranks > 1 else "none"),
        "inner_steps": d.inner_steps,
        "outer_optimizer": "SGD with Nesterov momentum" if d.outer_momentum > 0 else "SGD",
        "outer_lr": d.outer_lr,
        "outer_momentum": d.outer_momentum,
        "loss_normalisation": "per worker (no gradient sync between rounds)",
    }


def diloco_mesh(diloco: dict) -> tuple[tuple[str, int], ...]:
    """The mesh of a DiLoCo plan: the workers outermost (``diloco``), then, for workers of several
    ranks, the neighbouring ranks of one worker, which run DDP (``dp``) or FSDP2 (``dp_shard``)
    together."""
    ranks = diloco["ranks_per_worker"]
    inner = {"ddp": (("dp", ranks),), "fsdp2": (("dp_shard", ranks),), "none": ()}[diloco["inner"]]
    return (("diloco", diloco["workers"]),) + inner
