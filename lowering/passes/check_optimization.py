"""Cross-field checks of the optimizer, the learning-rate schedule and the samples, each reported
at the config line of the offending value.

- A schedule from ``fgc_runtime.train`` (``warmup_cosine``, ``constant``,
  ``warmup_stable_decay``, ``infinite_lr``) is built once on a dummy optimizer with the config's
  values (and, for ``budget_unit: tokens``, the plan's tokens per step), so the runtime's own
  argument checks (``ScheduleError``: a warmup longer than the total, a ratio outside [0, 1], a
  decay that leaves no room for the warmup, ...) become build errors. One set of rules serves both.
- ``fgc_runtime.optim:MuonAdamW`` needs whole weight matrices: the basic and ddp trainers only.
- Text samples need the whole model on each rank: not with the pipeline trainer.
"""

from __future__ import annotations

import torch

from fgc.ir import IRGraph
from fgc_runtime.optim import MuonAdamW
from fgc_runtime.train import ScheduleError

from ..context import LoweringContext
from .base import Pass

MUON_TRAINERS = ("basic", "ddp")


class CheckOptimization(Pass):
    name = "check-optimization"
    purpose = "check the lr schedule's budgets and ratios, the optimizer's trainer, and the samples"
    needs_clean_input = True

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        if ctx.settings is None or ctx.plan is None:
            return ir
        self._schedule(ir, ctx)
        self._optimizer(ir, ctx)
        self._samples(ir, ctx)
        return ir

    def _schedule(self, ir: IRGraph, ctx: LoweringContext) -> None:
        if "lr_scheduler" not in ir.targets:
            return
        node = ir.node(ir.targets["lr_scheduler"])
        symbol = ctx.symbols.get(node.id)
        if node.kind != "call" or symbol is None or getattr(symbol.obj, "__module__", None) != "fgc_runtime.train":
            return
        kwargs = {}
        for key, child in node.kwargs.items():
            value = ir.node(child)
            if value.kind != "value":
                return  # a computed argument: nothing to check before run time
            kwargs[key] = value.value
        if kwargs.get("budget_unit") == "tokens" and "tokens_per_step" not in kwargs:
            kwargs["tokens_per_step"] = ctx.plan.global_batch_size * ctx.plan.seq_len
        dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            symbol.obj(dummy, **kwargs)
        except ScheduleError as err:
            child = node.kwargs.get(err.argument)
            loc = ir.node(child).loc if child is not None else node.loc
            ctx.sink.error(str(err), loc)
        except TypeError as err:  # a required budget the partial leaves out
            ctx.sink.error(f"lr_scheduler: {err}", node.loc)

    def _optimizer(self, ir: IRGraph, ctx: LoweringContext) -> None:
        node = ir.node(ir.targets["optimizer"])
        symbol = ctx.symbols.get(node.id)
        obj = getattr(symbol, "obj", None)
        if isinstance(obj, type) and issubclass(obj, MuonAdamW) and ctx.plan.trainer_type not in MUON_TRAINERS:
            ctx.sink.error(
                f"the Muon optimizer needs whole weight matrices on every rank: it works with the "
                f"{' and '.join(MUON_TRAINERS)} trainers, not {ctx.plan.trainer_type}",
                node.loc,
            )

    def _samples(self, ir: IRGraph, ctx: LoweringContext) -> None:
        logging = ctx.settings.logging
        if not logging.sample_every:
            return
        trainer = ir.node(ir.targets["trainer"])
        group = ir.node(trainer.kwargs["logging"]) if "logging" in trainer.kwargs else None

        def loc(key: str):
            """The line of a logging field, else of the logging group, else of the trainer."""
            if group is None:
                return trainer.loc
            return ir.node(group.kwargs[key]).loc if key in group.kwargs else group.loc

        if logging.sample_every < 0:
            ctx.sink.error(f"sample_every must be 0 (never) or more, got {logging.sample_every}", loc("sample_every"))
        if logging.sample_tokens < 1:
            ctx.sink.error(f"sample_tokens must be at least 1, got {logging.sample_tokens}", loc("sample_tokens"))
        if logging.sample_temperature < 0:
            ctx.sink.error(
                f"sample_temperature must be 0 (greedy) or more, got {logging.sample_temperature}",
                loc("sample_temperature"),
            )
        if ctx.plan.trainer_type == "pipeline":
            ctx.sink.error(
                "text samples need the whole model on a rank: not available with the pipeline trainer",
                loc("sample_every"),
            )
