"""A decision of the plan-training pass: the pipeline. Whether the model can be cut into stages
under the schedule's rules, and the stage plan (layers balanced by parameter count, each
stage's rank)."""

from __future__ import annotations

from fgc.ir import IRGraph
from fgc.settings import MULTI_STAGE_SCHEDULES, SPLIT_BACKWARD_SCHEDULES, PipelineTrainer

from .construct import checked_meta_model
from .context import LoweringContext
from .stages import balanced_split, stage_ranks


def pipeline_plan(s: PipelineTrainer, ir: IRGraph, ctx: LoweringContext, err) -> dict | None:
    """Check the pipeline settings against each other and the model; the stage plan."""
    p = s.parallel
    ok = True
    degrees = p.pipeline_degree * p.data_degree * p.tensor_degree
    if degrees != p.nproc:
        err(
            "parallel.nproc",
            f"the world size (nproc {p.nproc}) is not the product of the parallel degrees: "
            f"pipeline_degree {p.pipeline_degree} x data_degree {p.data_degree}"
            + (f" x tensor_degree {p.tensor_degree}" if p.tensor_degree != 1 else "")
            + f" = {degrees}",
            hint="set nproc to the product, or change a degree",
        )
        ok = False
    layout = MULTI_STAGE_SCHEDULES.get(p.schedule, "single")
    per_rank = p.stages_per_rank if p.stages_per_rank is not None else (1 if layout == "single" else 2)
    if layout == "single" and per_rank != 1:
        err("parallel.stages_per_rank", f"the {p.schedule} schedule runs one stage per rank, not {per_rank}",
            hint="interleaved-1f1b, looped-bfs and interleaved-zero-bubble run several")
        ok = False
    elif layout == "loop" and per_rank < 2:
        err("parallel.stages_per_rank", f"the {p.schedule} schedule needs at least 2 stages per rank, got {per_rank}",
            hint="use gpipe or 1f1b for one stage per rank")
        ok = False
    elif layout == "v" and per_rank != 2:
        err("parallel.stages_per_rank", f"the {p.schedule} schedule runs exactly 2 stages per rank (the V layout), not {per_rank}")
        ok = False
    if not ok:
        return None
    model = checked_meta_model(ir, ctx)
    if model is None:
        return None
    model_node = ir.node(ir.targets["model"])
    from fgc_runtime.parallel import has_method
    from fgc_runtime.pipeline import PIPELINE_METHODS

    missing = [f"{name}()" for name in PIPELINE_METHODS if not has_method(model, name)]
    if missing:
        ctx.sink.error(
            f"the model ({type(model).__name__}) cannot be pipelined: it has no " + ", ".join(missing),
            model_node.loc,
            hint="a pipeline stage runs the model's own decoder_layers(), stage_modules(), embed(), "
            "layer_context(), run_layers(), final_hidden() and head(); the component library's CausalLM has them",
        )
        return None
    if has_method(model, "aux_loss") and model.aux_loss() is not None:
        # an MoE's load-balancing loss pools the routing of every layer: no stage has it all
        ctx.sink.error(
            f"the model ({type(model).__name__}) adds an auxiliary loss (aux_loss(): the load-balancing "
            "loss of its routed experts), which the pipeline trainer cannot add: it pools the routing "
            "of every layer, and a pipeline stage holds only some layers",
            model_node.loc,
            hint="use trainer_type ddp or fsdp2, or set output_router_logits: false to train without it",
        )
        return None
    layers = list(model.decoder_layers())
    first_modules = list(model.stage_modules(True, False).values())
    last_modules = list(model.stage_modules(False, True).values())
    first_params = {id(t) for m in first_modules for t in m.parameters()}
    if any(id(t) in first_params for m in last_modules for t in m.parameters()):
        tie = model_node.kwargs.get("tie_word_embeddings")
        ctx.sink.error(
            "tied word embeddings are not supported with pipeline parallelism: the embedding "
            "and the head are on different stages",
            ir.node(tie).loc if tie else model_node.loc,
            hint="set tie_word_embeddings: false",
        )
        return None
    stages = p.pipeline_degree * per_rank
    if stages > len(layers):
        err("parallel.pipeline_degree" if per_rank == 1 else "parallel.stages_per_rank",
            f"{stages} pipeline stages (pipeline_degree {p.pipeline_degree} x {per_rank} per rank) "
            f"for {len(layers)} decoder layers: each stage needs at least one layer")
        return None

    microbatches = p.microbatches if p.microbatches is not None else stages
    if microbatches < stages:
        err("parallel.microbatches",
            f"microbatches ({microbatches}) must be at least the number of pipeline stages ({stages})")
        ok = False
    elif p.schedule in ("interleaved-1f1b", "interleaved-zero-bubble"):
        rounds = max(1, microbatches // p.pipeline_degree)
        if microbatches % rounds:
            err("parallel.microbatches",
                f"the {p.schedule} schedule needs microbatches to be a multiple of its rounds "
                f"(microbatches // pipeline_degree = {rounds}), got {microbatches}",
                hint=f"use a multiple of pipeline_degree {p.pipeline_degree}")
            ok = False
    if s.micro_batch_size is not None:
        err("micro_batch_size",
            "micro_batch_size does not apply to the pipeline trainer: the batch is cut into "
            "parallel.microbatches pieces", hint="remove micro_batch_size; set microbatches")
        ok = False
    if s.batch_size % p.data_degree:
        err("batch_size", f"batch_size {s.batch_size} is not divisible by data_degree {p.data_degree}")
        ok = False
    elif (s.batch_size // p.data_degree) % microbatches:
        err("batch_size",
            f"the batch of each pipeline ({s.batch_size // p.data_degree} = batch_size {s.batch_size} "
            f"/ data_degree {p.data_degree}) is not divisible by microbatches {microbatches}")
        ok = False
    eval_batch = s.logging.eval_batch_size
    if eval_batch is not None and eval_batch != s.batch_size:
        err("logging.eval_batch_size",
            f"under pipeline parallelism the eval batch must equal the train batch "
            f"({s.batch_size}), got {eval_batch}: the schedule's micro-batch shapes are fixed",
            hint="remove eval_batch_size")
        ok = False
    if s.precision.mode == "fp16-mixed":
        err("precision.mode",
            "fp16 is not supported with pipeline parallelism: the loss scaler cannot see the "
            "gradients of other stages", hint="use bf16-mixed or bf16")
        ok = False
    if (s.TYPE == "fsdp2" or p.fsdp) and p.schedule in SPLIT_BACKWARD_SCHEDULES:
        # measured on 4 gloo ranks: the first step's gradient norm differs from 1f1b's (3.66 vs
        # 5.36) and the losses drift, so this combination is refused rather than trained wrong
        err("parallel.schedule",
            f"the {p.schedule} schedule splits the backward into input and weight passes, which gives "
            "wrong gradients when FSDP2 shards the stages in this version",
            hint="use gpipe, 1f1b, interleaved-1f1b or looped-bfs, or remove fsdp")
        ok = False
    if s.compile.enabled and p.schedule in SPLIT_BACKWARD_SCHEDULES:
        err("compile.enabled",
            f"the {p.schedule} schedule splits the backward into input and weight gradients, "
            "which torch.compile'd layers do not support", hint="disable compile or use another schedule")
        ok = False
    def count(*modules) -> int:
        return sum(t.numel() for m in modules for t in m.parameters())

    layer_params = [count(layer) for layer in layers]
    runs = balanced_split(layer_params, stages, count(*first_modules), count(*last_modules))
    ranks = stage_ranks(stages, p.pipeline_degree, layout)
    return {
        "schedule": p.schedule,
        "layout": layout,
        "microbatches": microbatches,
        "stages": [
            {
                "stage": i,
                "rank": ranks[i],
                "layers": [start, end],
                "params": sum(layer_params[start:end])
                + (count(*first_modules) if i == 0 else 0)
                + (count(*last_modules) if i == stages - 1 else 0),
            }
            for i, (start, end) in enumerate(runs)
        ],
    }
