"""What train.py's calls into the runtime get from the training program: the arguments that depend
on it, passed as ``(keyword, code)`` lists the template loops over, and the comments that say what
each call does for this plan. The template then has no branch per parallel dimension at these calls
(``fgc_runtime.mesh.layout``, ``fgc_runtime.parallel.parallelize``,
``fgc_runtime.pipeline.parallelize_stages``, ``DiLoCo``, ``build_model``)."""

from __future__ import annotations


def layout_comment(plan) -> str:
    """What the mesh means for the batches, for train.py's comment beside ``layout``."""
    mesh = " x ".join(f"{name} {size}" for name, size in plan.mesh)
    return (
        f"Which ranks read which batches (fgc_runtime/mesh.py), from the plan's mesh ({mesh}), checked "
        f"against the launch and the global batch: {_layout_words(plan)}"
    )


def _layout_words(plan) -> str:
    if plan.pipeline:
        groups = "tensor-parallel groups" if plan.tensor_parallel else "ranks"
        return f"pipelines of PIPELINE_DEGREE neighbouring {groups}, each pipeline on its own share of the batch."
    if plan.tensor_parallel:
        return (
            "groups of TENSOR_DEGREE neighbouring ranks split each layer's matrices and read the same "
            "batch; the data-parallel ranks read different batches."
        )
    if len(plan.mesh) > 1:
        return "the data-parallel ranks read different batches."
    if plan.nproc > 1:
        return "every rank reads its own batches (one dimension: mesh is None)."
    return "one process reads every batch (mesh is None)."


def parallelize_comment(plan, materialize: bool, weights: bool) -> str:
    """The steps of the plan's apply_order in words, for train.py's comment beside ``parallelize``;
    MATERIALIZE: the model is on the meta device until then (and WEIGHTS: pretrained)."""
    mesh = dict(plan.mesh)
    fsdp_over = (
        "the ranks of each DiLoCo worker"
        if plan.diloco
        else (
            "dp_shard, replicated over dp_replicate (HSDP)"
            if "dp_replicate" in mesh
            else "the data-parallel groups" if len(mesh) > 1 else "every rank"
        )
    )
    words = {
        "tensor parallel": "tensor parallel (q, k, v, gate and up projections split column-wise, o and down row-wise, over mesh.tp)",
        "activation checkpointing": f"activation checkpointing ({plan.activation_checkpointing}: activations recomputed in the backward)",
        "compile": "compile (each decoder layer; the first steps are slower while it compiles)",
        "fsdp2": f"FSDP2 ({plan.fsdp_units}, sharded over {fsdp_over})",
        "pipeline stages": "the pipeline's stages (below: built from the whole model)",
        "fsdp2 per stage": "FSDP2 on each stage (below, once they are built)",
    }
    head = "The plan's parallelism (fgc_runtime/parallel.py), applied to the model in place"
    if not plan.apply_order:
        return f"{head}: none, this plan changes no layer."
    text = f"{head}, in this order: " + "; then ".join(words[step] for step in plan.apply_order) + "."
    if materialize:
        text += (
            " Only then does each rank allocate its shards, and give them the values of the whole model"
            + (" (it reads its shards of the pretrained weights)." if weights else ".")
        )
    return text


def parallelize_args(plan, root: str, shard_weights: bool, rules: bool) -> list[tuple[str, str]]:
    """The keyword arguments train.py passes to ``parallelize``: the options of each step in the
    plan's apply_order (``fgc_runtime.parallel.STEPS``), each its train.py constant (ROOT, the
    module FSDP2 makes its root, for ``root``); with SHARD_WEIGHTS (a model built on the meta
    device, not in pipeline stages, from pretrained weights), the weights each rank reads its
    shards of once they are allocated (and with RULES, model.py's TENSOR_RULES)."""
    from fgc_runtime.parallel import STEPS

    args: dict[str, str] = {}
    for step in plan.apply_order:
        for option in STEPS[step].options:
            args[option] = root if option == "root" else option.upper()
    if shard_weights:
        args["weights"] = "args.weights"
    if shard_weights and rules:
        args["tensor_rules"] = "TENSOR_RULES"
    return list(args.items())


def diloco_comment(plan) -> str:
    """Who a rank of a DiLoCo worker of several ranks syncs with, for train.py's comment beside
    ``DiLoCo``."""
    pipelined, sharded = bool(plan.pipeline), plan.diloco["inner"] == "fsdp2" or bool(plan.tensor_parallel)
    worker = "its pipelines' ranks" if pipelined else "the ranks of mesh.worker_group"
    text = f"A worker is {worker}; each rank syncs with the ranks in its place in the other workers (mesh.outer_group)"
    if pipelined:
        text += ", its global parameters those of its stages" + (" (its shards of them)" if sharded else "")
    elif sharded:
        text += ", its global parameters its own shards"
    return text + "."


def sync_args(plan, chunked: bool) -> list[tuple[str, str]]:
    """The keyword arguments of train.py's step sync: a pipeline's (``pipeline.pipeline_sync``)
    takes this rank's part of the model; the others' (``step_sync``) the model and FSDP2's root
    (the loss head around the model under the CHUNKED loss). DiLoCo's outer loop for both."""
    args = [("model", "part")] if plan.pipeline else [("model", "model"), ("fsdp_root", "loss_model" if chunked else "model")]
    if plan.diloco:
        args.append(("outer", "diloco"))
    return args


def stages_args(head: bool, weights: bool, rules: bool) -> list[tuple[str, str]]:
    """The keyword arguments train.py passes to ``pipeline.parallelize_stages``: ``head=False``
    when the loss applies the head (the chunked loss), and with WEIGHTS (pretrained, the model
    on the meta device) the weights each rank reads its stages' tensors of (and with RULES,
    model.py's TENSOR_RULES)."""
    args = [] if head else [("head", "False")]
    if weights:
        args.append(("weights", "args.weights"))
    if weights and rules:
        args.append(("tensor_rules", "TENSOR_RULES"))
    return args


def stages_comment(plan, weights: bool) -> str:
    """What ``pipeline.parallelize_stages`` does under PLAN, for train.py's comment beside it."""
    text = (
        'This rank runs the stages PLAN["pipeline"] gives it (fgc_runtime/pipeline.py); `part` holds their '
        "layers, under the whole model's parameter names."
    )
    if weights:
        text += " Each rank reads its stages' tensors of the pretrained weights."
    if "fsdp2 per stage" in plan.apply_order:
        text += (
            " FSDP2 then shards each stage over the pipeline's data-parallel replicas: each decoder layer "
            "is one unit, the stage's other modules another."
        )
    return text


def model_args(meta: bool, precision: str, pretrained: bool) -> list[tuple[str, str]]:
    """The keyword arguments train.py passes to model.py's ``build_model``: the device (the meta
    device when each rank materialises only its share), the dtype of bf16 weights, and the
    pretrained weights (read later, by each rank for its share, on the meta device)."""
    args = [("device", '"meta"' if meta else "dist.device")]
    if precision == "bf16":
        args.append(("dtype", "torch.bfloat16"))
    if pretrained and not meta:
        args.append(("weights_dir", "args.weights"))
    return args
