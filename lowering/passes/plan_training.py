"""Build the trainer settings, check them, and plan how the package runs."""

from __future__ import annotations

import inspect


from fgc.errors import Location
from fgc.ir import IRGraph
from fgc.settings import (
    MULTI_STAGE_SCHEDULES,
    SETTING_GROUPS,
    SPLIT_BACKWARD_SCHEDULES,
    BasicTrainer,
    DiLoCoTrainer,
    PipelineTrainer,
)

from ..construct import construct, meta_model
from ..context import LoweringContext
from ..plan import Plan
from ..stages import balanced_split, stage_ranks
from ..types import range_errors
from .base import Pass

REQUIRED_TARGETS = ("model", "optimizer", "trainer")


class PlanTraining(Pass):
    name = "plan-training"
    purpose = "construct the typed trainer settings, check their fields, and plan ranks and batches"
    needs_clean_input = True

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        missing = [t for t in REQUIRED_TARGETS if t not in ir.targets]
        if missing:
            ctx.sink.error(
                "a training config needs the target(s) " + ", ".join(repr(m) for m in missing),
                Location(str(ctx.config)),
            )
            return ir
        if ctx.sink.errors:
            return ir  # settings cannot be built from a graph that did not resolve
        node = ir.node(ir.targets["trainer"])
        symbol = ctx.symbols.get(node.id)
        if node.kind != "call" or symbol is None or not (
            isinstance(symbol.obj, type) and issubclass(symbol.obj, BasicTrainer)
        ):
            ctx.sink.error(
                "'trainer' must be a trainer settings class, e.g. !singleton:fgc.settings:DDPTrainer",
                node.loc,
            )
            return ir
        settings = construct(ir, ctx, node.id)
        ctx.settings = settings
        ctx.plan = self._plan(settings, ir, ctx)
        return ir

    def _plan(self, s: BasicTrainer, ir: IRGraph, ctx: LoweringContext) -> Plan | None:
        trainer = ir.node(ir.targets["trainer"])

        def where(*path: str) -> Location:
            """The config line of a settings field, e.g. where("parallel", "microbatches"): the
            value's own line when the config sets it, else the nearest enclosing node's."""
            node, loc = trainer, trainer.loc
            for key in path:
                if key not in node.kwargs:
                    return node.key_locs.get(key, loc)
                node = ir.node(node.kwargs[key])
                loc = node.loc
            return loc

        def err(field: str, message: str, *, hint: str | None = None) -> None:
            ctx.sink.error(message, where(*field.split(".")), hint=hint)

        # check-types saw the values the config writes; these are the values it computes too
        for path, message in range_errors(s):
            err(".".join(path), message)
        if ctx.sink.errors:
            return None
        for group, cls in SETTING_GROUPS.items():
            if hasattr(s, group) and not isinstance(getattr(s, group), cls):
                err(group, f"'{group}' must be !singleton:fgc.settings:{cls.__name__}")
        if ctx.sink.errors:
            return None
        if not s.data.text_files and not s.data.data_dir:
            err("data", "the data settings name neither text_files nor data_dir")
        if s.precision.mode == "fp16-mixed" and s.TYPE == "fsdp2":
            err("precision.mode", "fp16-mixed is not supported with FSDP2 in this version: its gradient "
                "scaler would need the sharded gradients", hint="use bf16-mixed")
            return None
        diloco = None
        if isinstance(s, DiLoCoTrainer):
            diloco = self._diloco(s, err)
            if diloco is None:
                return None
        if s.optimizer_in_backward:
            # each parameter steps before the other gradients exist: nothing may need them all
            conflicts = [
                (s.TYPE == "diloco", "the diloco trainer in this version"),
                (s.TYPE not in ("basic", "diloco"), "the " + s.TYPE + " trainer, whose gradients are reduced over ranks after the backward"),
                (s.grad_clip is not None, "gradient clipping, which needs the norm of every gradient first"),
                (s.precision.mode == "fp16-mixed", "fp16-mixed, whose loss scaler checks every gradient first"),
            ]
            for conflict, why in conflicts:
                if conflict:
                    err("optimizer_in_backward", f"optimizer_in_backward cannot be combined with {why}",
                        hint="set optimizer_in_backward: false, or remove the conflicting setting")
            if ctx.sink.errors:
                return None
        pipelined = isinstance(s, PipelineTrainer)
        if s.document_masking:
            if pipelined:
                err("document_masking", "document_masking is not supported by the pipeline trainer in this "
                    "version: its stages do not pass document ids", hint="set document_masking: false")
                return None
            model = self._meta_model(ir, ctx)
            if model is None:
                return None
            params = list(inspect.signature(model.forward).parameters)
            if len(params) < 2:
                err("document_masking", f"document_masking needs a model whose forward takes document ids "
                    f"after input_ids; {type(model).__name__}.forward takes ({', '.join(params)})")
                return None
        if pipelined:
            pipeline = self._pipeline(s, ir, ctx, err)
            if pipeline is None:
                return None
            per_rank = s.batch_size // s.parallel.data_degree
            micro = per_rank // pipeline["microbatches"]
            mesh = (("dp", s.parallel.data_degree), ("pp", s.parallel.pipeline_degree))
        else:
            pipeline = None
            tensor_degree = getattr(s.parallel, "tensor_degree", 1) if s.TYPE == "fsdp2" else 1
            if tensor_degree != 1 and not self._tensor_parallel_ok(s, ir, ctx, err, where):
                return None
            # the ranks of one tensor-parallel group read the same batch
            dp = s.nproc // tensor_degree
            dp_what = f"nproc {s.nproc}" if tensor_degree == 1 else f"the {dp} data-parallel groups"
            if s.batch_size % dp:
                err("batch_size", f"batch_size {s.batch_size} is not divisible by {dp_what}")
                return None
            per_rank = s.batch_size // dp
            micro = per_rank if s.micro_batch_size is None else s.micro_batch_size
            if micro < 1 or per_rank % micro:
                err(
                    "micro_batch_size",
                    f"the per-rank batch ({per_rank} = batch_size {s.batch_size} / {dp_what}) "
                    f"is not divisible by micro_batch_size {micro}",
                )
                return None
            if s.optimizer_in_backward and per_rank // micro > 1:
                err(
                    "optimizer_in_backward",
                    f"optimizer_in_backward cannot be combined with gradient accumulation "
                    f"({per_rank // micro} micro-batches a step): it steps during the first backward",
                    hint="remove micro_batch_size, or set optimizer_in_backward: false",
                )
                return None
            eval_batch = s.logging.eval_batch_size
            if eval_batch is not None and eval_batch % dp:
                err("logging.eval_batch_size", f"eval_batch_size {eval_batch} is not a positive multiple of {dp_what}")
                return None
            mesh = () if s.TYPE == "basic" else ((("dp_shard" if s.TYPE == "fsdp2" else "dp"), dp),)
            if tensor_degree != 1:
                mesh += (("tp", tensor_degree),)
        ac_settings = s.activation_checkpointing
        which = "decoder layer" if ac_settings.every_n_layers == 1 else f"{_ordinal(ac_settings.every_n_layers)} decoder layer"
        ac = {
            "none": "none",
            "full": f"every {which}",
            "selective": f"every {which}, selective: matmul and attention outputs kept",
        }[ac_settings.mode]
        compile_ = "per decoder layer" if s.compile.enabled else "none"
        fsdp = s.TYPE == "fsdp2"
        tensor_parallel = None
        if dict(mesh).get("tp", 1) > 1:
            tensor_parallel = {"degree": dict(mesh)["tp"], **self._tp_styles(self._meta_model(ir, ctx))}
        order = tuple(
            step
            for step, used in (
                ("tensor parallel", tensor_parallel is not None),
                ("activation checkpointing", ac != "none"),
                ("compile", compile_ != "none"),
                ("fsdp2", fsdp),
            )
            if used
        )
        return Plan(
            fsdp_units="each decoder layer, then the root" if fsdp else "none",
            activation_checkpointing=ac,
            compile=compile_,
            apply_order=order,
            trainer_type=s.TYPE,
            nproc=s.nproc,
            launcher="torchrun" if s.TYPE != "basic" else "python",
            global_batch_size=s.batch_size,
            batch_per_rank=per_rank,
            micro_batch_size=micro,
            grad_accum_steps=1 if pipelined else per_rank // micro,
            seq_len=s.seq_len,
            precision=s.precision.mode,
            mesh=mesh,
            tensor_parallel=tensor_parallel,
            pipeline=pipeline,
            diloco=diloco,
        )

    @staticmethod
    def _diloco(s: DiLoCoTrainer, err) -> dict | None:
        """Check the DiLoCo settings; the plan's ``diloco`` entry."""
        d = s.diloco
        if s.precision.mode == "fp16-mixed":
            err("precision.mode", "fp16-mixed is not supported with DiLoCo in this version: each worker "
                "would need its own gradient scaler in the checkpoint", hint="use bf16-mixed")
            return None
        return {
            "workers": s.nproc,
            "inner_steps": d.inner_steps,
            "outer_optimizer": "SGD with Nesterov momentum" if d.outer_momentum > 0 else "SGD",
            "outer_lr": d.outer_lr,
            "outer_momentum": d.outer_momentum,
            "loss_normalisation": "per worker (no gradient sync between rounds)",
        }

    @staticmethod
    def _tp_styles(model) -> dict:
        """The plan's account of tensor parallelism: the projections the decoder layers' parts
        split column-wise and row-wise (as their ``tp_plan`` names them, each name once, in the
        order of the first layer), and what stays whole."""
        from fgc_runtime.parallel import layer_tp_plan

        styles: dict[str, list[str]] = {"colwise": [], "rowwise": []}
        whole: list[str] = []
        for layer in model.decoder_layers():
            plan = layer_tp_plan(layer)
            for name, style in plan.items():
                leaf = name.split(".")[-1]
                if leaf not in styles.setdefault(style, []):
                    styles[style].append(leaf)
            # a layer's part with weights of its own and no projection in the plan (a norm, or
            # a part that declares no tp_plan) stays whole
            for child, module in layer.named_children():
                split = any(name.startswith(child + ".") for name in plan)
                if not split and any(True for _ in module.parameters()) and child not in whole:
                    whole.append(child)
        replicated = "embedding, final norm, head"
        if whole:
            replicated += "; in each layer: " + ", ".join(whole)
        return {**styles, "replicated": replicated}

    def _tensor_parallel_ok(self, s, ir: IRGraph, ctx: LoweringContext, err, where) -> bool:
        """Check the tensor degree against the world size and the divisibility the decoder layers'
        parts declare (``tp_divisible``: heads, MLP width)."""
        from torch import nn

        from fgc_runtime.parallel import has_method, layer_tp_plan

        degree = s.parallel.tensor_degree
        if s.nproc % degree:
            err(
                "parallel.tensor_degree",
                f"the world size (nproc {s.nproc}) is not divisible by tensor_degree {degree}: the world "
                f"size is the product of the parallel degrees (data-parallel groups x tensor_degree)",
                hint="set nproc to a multiple of tensor_degree",
            )
            return False
        model = self._meta_model(ir, ctx)
        if model is None:
            return False
        if not has_method(model, "decoder_layers"):
            ctx.sink.error(
                f"tensor parallelism needs the model's decoder_layers(): {type(model).__name__} has no such method",
                ir.node(ir.targets["model"]).loc,
                hint="the component library's CausalLM has it",
            )
            return False
        layers = list(model.decoder_layers())
        for layer in layers:
            plan = layer_tp_plan(layer)
            split = {n: m for n, m in layer.named_modules() if n in plan}
            if not plan:
                err("parallel.tensor_degree", f"tensor parallelism needs decoder layers whose parts declare a "
                    f"tp_plan (which projections to split); no part of {type(layer).__name__} does")
                return False
            wrong = [n for n in plan if not isinstance(split.get(n), nn.Linear)]
            bad_styles = sorted({style for style in plan.values() if style not in ("colwise", "rowwise")})
            if wrong or bad_styles:
                ctx.sink.error(
                    f"a tp_plan of {type(layer).__name__} names "
                    + (f"{', '.join(wrong)}, not Linear submodule(s)" if wrong else "")
                    + ("; " if wrong and bad_styles else "")
                    + (f"the style(s) {', '.join(bad_styles)}, not colwise or rowwise" if bad_styles else ""),
                    ir.node(ir.targets["model"]).loc,
                )
                return False
        ok = True
        seen = set()
        for layer in layers:
            for module in layer.modules():
                for attr in getattr(module, "tp_divisible", ()):
                    value = getattr(module, attr, None)
                    if isinstance(value, int) and value % degree and attr not in seen:
                        seen.add(attr)
                        what = _TP_SHARES.get(attr, attr)
                        ctx.sink.error(
                            f"{attr} {value} is not divisible by tensor_degree {degree}: each tensor-parallel "
                            f"rank holds an equal share of the {what}",
                            self._model_setting(ir, attr) or where("parallel", "tensor_degree"),
                        )
                        ok = False
        return ok

    @staticmethod
    def _model_setting(ir: IRGraph, key: str):
        """The config line that sets KEY on a component of the model (None when none does)."""
        for node_id in ir.reachable(ir.targets["model"]):
            node = ir.node(node_id)
            if node.kind == "call" and key in node.kwargs:
                return ir.node(node.kwargs[key]).loc
        return None

    def _pipeline(self, s: "PipelineTrainer", ir: IRGraph, ctx: LoweringContext, err) -> dict | None:
        """Check the pipeline settings against each other and the model; the stage plan."""
        p = s.parallel
        ok = True
        if p.pipeline_degree * p.data_degree != p.nproc:
            err(
                "parallel.nproc",
                f"the world size (nproc {p.nproc}) is not the product of the parallel degrees: "
                f"pipeline_degree {p.pipeline_degree} x data_degree {p.data_degree} = "
                f"{p.pipeline_degree * p.data_degree}",
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
        model = self._meta_model(ir, ctx)
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

    def _meta_model(self, ir: IRGraph, ctx: LoweringContext):
        """The model target built on the meta device; None (and an error) when it does not build."""
        try:
            return meta_model(ir, ctx)
        except Exception as exc:
            ctx.sink.error(
                f"the model does not build: {type(exc).__name__}: {exc}", ir.node(ir.targets["model"]).loc
            )
            return None


# what a tensor-parallel rank holds an equal share of, by the attribute a part declares divisible
_TP_SHARES = {
    "num_attention_heads": "attention heads",
    "num_key_value_heads": "key/value heads",
    "intermediate_size": "MLP intermediate size",
}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
