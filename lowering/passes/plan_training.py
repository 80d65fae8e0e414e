"""Build the trainer settings, check them, and plan how the package runs."""

from __future__ import annotations


from fgc.errors import Location
from fgc.ir import IRGraph
from fgc.settings import SETTING_GROUPS, BasicTrainer

from ..construct import construct
from ..context import LoweringContext
from ..plan import Plan
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
        loc = ir.node(ir.targets["trainer"]).loc

        def err(field: str, message: str) -> None:
            node = ir.node(ir.targets["trainer"])
            where = node.key_locs.get(field, loc)
            ctx.sink.error(message, where)

        for field in ("max_steps", "batch_size", "seq_len"):
            if getattr(s, field) < 1:
                err(field, f"{field} must be at least 1, got {getattr(s, field)}")
        if s.nproc < 1:
            err("parallel", f"nproc must be at least 1, got {s.nproc}")
        if ctx.sink.errors:
            return None
        for group, cls in SETTING_GROUPS.items():
            if hasattr(s, group) and not isinstance(getattr(s, group), cls):
                err(group, f"'{group}' must be !singleton:fgc.settings:{cls.__name__}")
        if ctx.sink.errors:
            return None
        if s.batch_size % s.nproc:
            err("batch_size", f"batch_size {s.batch_size} is not divisible by nproc {s.nproc}")
            return None
        per_rank = s.batch_size // s.nproc
        micro = per_rank if s.micro_batch_size is None else s.micro_batch_size
        if micro < 1 or per_rank % micro:
            err(
                "micro_batch_size",
                f"the per-rank batch ({per_rank} = batch_size {s.batch_size} / nproc {s.nproc}) "
                f"is not divisible by micro_batch_size {micro}",
            )
            return None
        if not s.data.text_files and not s.data.data_dir:
            err("data", "the data settings name neither text_files nor data_dir")
        ac = "per decoder layer" if s.activation_checkpointing.mode == "full" else "none"
        compile_ = "per decoder layer" if s.compile.enabled else "none"
        fsdp = s.TYPE == "fsdp2"
        order = tuple(
            step
            for step, used in (
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
            grad_accum_steps=per_rank // micro,
            seq_len=s.seq_len,
            precision=s.precision.mode,
        )
