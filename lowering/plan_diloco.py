"""A decision of the plan-training pass: DiLoCo's outer loop. The workers the ranks form, the
outer optimizer, and the mesh dimensions of the workers."""

from __future__ import annotations

from fgc.settings import DiLoCoTrainer, FSDPSettings, PipelineSettings


def diloco_plan(s: DiLoCoTrainer, err) -> dict | None:
    """Check the DiLoCo settings; the plan's ``diloco`` entry (None after an error)."""
    d = s.diloco
    if s.precision.mode == "fp16-mixed":
        err("precision.mode", "fp16-mixed is not supported with DiLoCo in this version: each worker "
            "would need its own gradient scaler in the checkpoint", hint="use bf16-mixed")
        return None
    tensor = s.parallel.tensor_degree
    # a pipeline inside each worker: a copy of the model spans pipeline_degree x tensor_degree ranks
    pipelined = isinstance(s.parallel, PipelineSettings)
    stages = s.parallel.pipeline_degree if pipelined else 1
    # by default a worker is one rank, one tensor-parallel group, or one pipeline
    workers = s.nproc // (tensor * stages) if d.workers is None else d.workers
    if s.nproc % workers:
        err(
            "diloco.workers",
            f"nproc {s.nproc} does not split into {workers} DiLoCo workers: each worker is "
            "nproc / workers ranks",
            hint=f"set workers to a divisor of {s.nproc}",
        )
        return None
    ranks = s.nproc // workers
    # with tensor parallelism, a worker's ranks form tensor-parallel groups of tensor_degree
    # neighbours; the groups are the worker's data-parallel ranks
    if ranks % (tensor * stages):
        what = f"tensor-parallel groups of tensor_degree {tensor}" if stages == 1 else (
            f"pipelines of pipeline_degree {stages}" + (f" x tensor_degree {tensor}" if tensor > 1 else ""))
        err(
            "parallel.pipeline_degree" if stages > 1 else "parallel.tensor_degree",
            f"a DiLoCo worker's {ranks} ranks (nproc {s.nproc} / {workers} workers) do not split into {what}",
            hint=f"set diloco_workers so that nproc / diloco_workers is a multiple of {tensor * stages}",
        )
        return None
    data = ranks // (tensor * stages)
    # FSDPSettings as the parallel settings: each worker shards its copy over its ranks; a
    # pipeline's fsdp: each worker's pipelines shard their stages (FSDP2 per stage)
    sharded = isinstance(s.parallel, FSDPSettings) or (pipelined and s.parallel.fsdp)
    if sharded and data == 1:
        if stages > 1:
            what = f"{workers} workers of nproc {s.nproc} are one pipeline each"
        elif tensor == 1:
            what = f"{workers} workers of nproc {s.nproc} are one rank each"
        else:
            what = f"{workers} workers of nproc {s.nproc} are one tensor-parallel group of {tensor} ranks each"
        err(
            "parallel.fsdp" if pipelined else "parallel",
            f"FSDP2 inside DiLoCo workers needs workers of 2 or more data-parallel ranks: {what}",
            hint=f"set diloco_workers to a divisor of {s.nproc // (tensor * stages)} below it, or do not shard (diloco_fsdp: false)",
        )
        return None
    # hybrid sharding (HSDP) inside a worker: its data-parallel ranks form replicate_degree
    # copies, each sharded over the rest
    replicate = getattr(s.parallel, "replicate_degree", 1) if sharded else 1
    if data % replicate:
        err(
            "parallel.replicate_degree",
            f"a DiLoCo worker's {data} data-parallel ranks do not split into replicate_degree {replicate} "
            "copies (HSDP inside each worker: replicate x shard = nproc / (workers x tensor_degree))",
            hint=f"set replicate_degree to a divisor of {data}",
        )
        return None
    return {
        "workers": workers,
        "ranks_per_worker": ranks,
        # the worker's data-parallel ranks (its ranks, or its tensor-parallel groups)
        "data_ranks_per_worker": data,
        "tensor_degree": tensor,
        "pipeline_degree": stages,
        "replicate_degree": replicate,
        # what a worker's data-parallel ranks run over them: DDP (an explicit gradient mean with
        # tensor parallelism, a sum after the schedule between pipelines), or FSDP2 (sharding
        # its copy)
        "inner": "fsdp2" if sharded else ("ddp" if data > 1 else "none"),
        "inner_steps": d.inner_steps,
        "outer_optimizer": "SGD with Nesterov momentum" if d.outer_momentum > 0 else "SGD",
        "outer_lr": d.outer_lr,
        "outer_momentum": d.outer_momentum,
        "loss_normalisation": "per worker (no gradient sync between rounds)",
    }


def diloco_mesh(diloco: dict) -> tuple[tuple[str, int], ...]:
    """The mesh of a DiLoCo plan: the workers outermost (``diloco``), then, for workers of several
    data-parallel ranks, the neighbouring ranks of one worker, which run DDP (``dp``) or FSDP2
    (``dp_shard``) together (the tensor-parallel dimension, innermost, is the caller's)."""
    ranks, replicate = diloco["data_ranks_per_worker"], diloco.get("replicate_degree", 1)
    if diloco.get("pipeline_degree", 1) > 1:  # a worker's pipelines (their replicas: dp, even of 1)
        replicas = "dp_shard" if diloco["inner"] == "fsdp2" else "dp"  # FSDP2 per stage over them
        return (("diloco", diloco["workers"]), (replicas, ranks), ("pp", diloco["pipeline_degree"]))
    if diloco["inner"] == "fsdp2" and replicate > 1:  # HSDP inside each worker
        return (("diloco", diloco["workers"]), ("dp_replicate", replicate), ("dp_shard", ranks // replicate))
    inner = {"ddp": (("dp", ranks),), "fsdp2": (("dp_shard", ranks),), "none": ()}[diloco["inner"]]
    return (("diloco", diloco["workers"]),) + inner


def describe_workers(diloco: dict) -> str:
    """The workers of a DiLoCo plan in words: "2 workers", "2 workers of 4 ranks (tensor parallel
    over 2 ranks, DDP over 2 groups inside a worker)"."""
    text = f"{diloco['workers']} workers"
    ranks, data, tensor = diloco["ranks_per_worker"], diloco["data_ranks_per_worker"], diloco.get("tensor_degree", 1)
    if ranks == 1:
        return text
    replicate = diloco.get("replicate_degree", 1)
    inner = {"ddp": "DDP", "fsdp2": "FSDP2", "none": ""}[diloco["inner"]]
    copies = f": {replicate} copies x {data // replicate} shards" if replicate > 1 else ""
    if replicate > 1:
        inner = "HSDP"
    stages = diloco.get("pipeline_degree", 1)
    if stages > 1:
        inside = f"a pipeline of {stages} stages" + (f" x tensor parallel over {tensor} ranks" if tensor > 1 else "")
        if data > 1:
            inside = f"{data} pipelines of {stages} stages" + (f" x {tensor} tensor-parallel ranks" if tensor > 1 else "")
            if diloco["inner"] == "fsdp2":
                inside += " sharded by FSDP2 per stage"
    elif tensor == 1:
        inside = inner
    else:
        inside = f"tensor parallel over {tensor} ranks" + (f", {inner} over {data} groups" if inner else "")
    return f"{text} of {ranks} ranks ({inside} inside a worker{copies})"
