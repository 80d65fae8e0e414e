"""Build the trainer settings, check them, and plan how the package runs: ranks, batches, the mesh
of parallel dimensions and the order things are applied in. Its decisions about tensor
parallelism, the pipeline and DiLoCo's outer loop are in ``lowering/plan_tensor_parallel.py``,
``lowering/plan_pipeline.py`` and ``lowering/plan_diloco.py``, a pretrained vocabulary grown to
the data's in ``lowering/plan_vocab.py``."""

from __future__ import annotations

import inspect
from dataclasses import replace

from fgc.errors import Location
from fgc.ir import IRGraph
from fgc.settings import SETTING_GROUPS, BasicTrainer, DiLoCoTrainer, PipelineSettings, PipelineTrainer

from ..construct import checked_meta_model, construct
from ..context import LoweringContext
from ..plan import Plan
from ..plan_diloco import diloco_mesh, diloco_plan
from ..plan_pipeline import pipeline_plan
from ..plan_tensor_parallel import tensor_parallel_ok, tp_styles
from ..plan_vocab import grow_vocabulary
from ..program import provenance
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
        # first, so that every model built on the meta device below has the grown vocabulary
        ir, growth = grow_vocabulary(settings, ir, ctx)
        ctx.plan = self._plan(settings, ir, ctx)
        if ctx.plan is not None and growth is not None:
            ctx.plan = replace(ctx.plan, vocab_growth=growth)
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

        def is_set(*path: str) -> bool:
            node = trainer
            for key in path:
                if key not in node.kwargs:
                    return False
                node = ir.node(node.kwargs[key])
            return True

        def setter(*path: str) -> str:
            """The line that set a value: the knob's last setter (or its -D) when the config line
            prints a knob, else that line."""
            loc = where(*path)
            origins = ctx.origins(loc) if ctx.origins is not None else []
            if len(origins) > 1:
                loc, dvar = origins[-2]
                return f"{dvar} ({loc})" if dvar else str(loc)
            return str(loc)

        ctx.provenance = provenance(s, setter, is_set)

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
            diloco = diloco_plan(s, err)
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
        # the pipeline trainer, or DiLoCo workers of pipelines (PipelineSettings as its parallel)
        pipelined = isinstance(s, PipelineTrainer) or isinstance(getattr(s, "parallel", None), PipelineSettings)
        if s.document_masking:
            if pipelined:
                err("document_masking", "document_masking is not supported by the pipeline trainer in this "
                    "version: its stages do not pass document ids", hint="set document_masking: false")
                return None
            model = checked_meta_model(ir, ctx)
            if model is None:
                return None
            params = list(inspect.signature(model.forward).parameters)
            if len(params) < 2:
                err("document_masking", f"document_masking needs a model whose forward takes document ids "
                    f"after input_ids; {type(model).__name__}.forward takes ({', '.join(params)})")
                return None
        if pipelined:
            pipeline = pipeline_plan(s, ir, ctx, err)
            if pipeline is None:
                return None
            tensor_degree = s.parallel.tensor_degree
            if tensor_degree != 1 and not tensor_parallel_ok(s, ir, ctx, err, where):
                return None
            per_rank = s.batch_size // s.parallel.data_degree
            micro = per_rank // pipeline["microbatches"]
            # pipeline neighbours are near each other, the ranks of a tensor-parallel group nearest
            mesh = (("dp_shard" if s.parallel.fsdp else "dp", s.parallel.data_degree), ("pp", s.parallel.pipeline_degree))
            if diloco is not None:  # the pipelines form the workers: DiLoCo outermost
                mesh = diloco_mesh(diloco)
            if tensor_degree != 1:
                mesh += (("tp", tensor_degree),)
        else:
            pipeline = None
            tensor_degree = s.parallel.tensor_degree if s.TYPE != "basic" else 1
            if tensor_degree != 1 and s.precision.mode == "fp16-mixed":
                err("precision.mode", "fp16-mixed is not supported with tensor parallelism in this version: "
                    "its gradient scaler would need the sharded gradients", hint="use bf16-mixed")
                return None
            if tensor_degree != 1 and not tensor_parallel_ok(s, ir, ctx, err, where):
                return None
            # the ranks of one tensor-parallel group read the same batch
            dp = s.nproc // tensor_degree
            replicate = getattr(getattr(s, "parallel", None), "replicate_degree", 1)
            if dp % replicate:
                err(
                    "parallel.replicate_degree",
                    f"the {dp} data-parallel ranks (nproc {s.nproc}"
                    + (f" / tensor_degree {tensor_degree}" if tensor_degree != 1 else "")
                    + f") do not split into replicate_degree {replicate} copies: the world size is the "
                    "product of the parallel degrees (replicate x shard x tensor)",
                    hint=f"set nproc to a multiple of {replicate * tensor_degree}",
                )
                return None
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
            if s.TYPE == "basic":
                mesh = ()
            elif diloco is not None:
                mesh = diloco_mesh(diloco)
            elif s.TYPE != "fsdp2":
                mesh = (("dp", dp),)
            elif replicate != 1:
                mesh = (("dp_replicate", replicate), ("dp_shard", dp // replicate))
            else:
                mesh = (("dp_shard", dp),)
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
        fsdp = s.TYPE == "fsdp2" or (pipelined and s.parallel.fsdp) or (diloco is not None and diloco["inner"] == "fsdp2")
        tensor_parallel = None
        if dict(mesh).get("tp", 1) > 1:
            tensor_parallel = {"degree": dict(mesh)["tp"], **tp_styles(checked_meta_model(ir, ctx))}
        order = tuple(
            step
            for step, used in (
                ("tensor parallel", tensor_parallel is not None),
                ("activation checkpointing", ac != "none"),
                ("compile", compile_ != "none"),
                ("fsdp2", fsdp and not pipelined),
                # a pipeline's stages are built from the whole model, then FSDP2 shards each one
                ("pipeline stages", pipelined),
                ("fsdp2 per stage", fsdp and pipelined),
            )
            if used
        )
        return Plan(
            fsdp_units=(
                "none"
                if not fsdp
                else ("each decoder layer, then each stage's other modules" if pipelined else "each decoder layer, then the root")
                + ("; hybrid: sharded over dp_shard, replicated over dp_replicate" if "dp_replicate" in dict(mesh) else "")
            ),
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


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
