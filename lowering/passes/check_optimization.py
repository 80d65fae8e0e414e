"""Cross-field checks of the optimizer, the learning-rate schedule and the samples, each reported
at the config line of the offending value.

- A schedule from ``fgc_runtime.train`` (``warmup_cosine``, ``constant``,
  ``warmup_stable_decay``, ``infinite_lr``) is built once on a dummy optimizer with the config's
  values (and, for ``budget_unit: tokens``, the plan's tokens per step), so the runtime's own
  argument checks (``ScheduleError``: a warmup longer than the total, a ratio outside [0, 1], a
  decay that leaves no room for the warmup, ...) become build errors. One set of rules serves both.
- A ``torch.optim.Optimizer`` is built once on a dummy parameter with the config's values, so the
  optimizer's own checks of its hyperparameters (a negative or NaN ``lr``, ``betas`` outside
  [0, 1), a negative ``weight_decay``, ...) become build errors, at the line of the argument to
  blame: the one whose value, left to its default, makes the optimizer build.
- ``fgc_runtime.optim:MuonAdamW`` needs whole weight matrices: the basic and ddp trainers only.
- ``fgc_runtime.optim:Adafactor`` (factored over whole rows and columns) and ``:AdamW`` (whose
  state dict carries its stochastic-rounding generators, which the fsdp2 and pipeline trainers'
  name-keyed optimizer checkpoints would drop): the basic and ddp trainers only, the ones they
  are tested with, and neither with tensor parallelism, whose weights are DTensors sharded
  across ranks (both failed at the first step: Adafactor's factored moments, AdamW's rounding
  bits added to a DTensor).
- ``bf16_stochastic_round: true`` rounds bf16 weights: it needs precision ``bf16`` (with the
  other precisions the weights are fp32 and it would silently do nothing).
- Text samples need the whole model on each rank: not with the pipeline trainer.
"""

from __future__ import annotations

import torch

from fgc.ir import IRGraph
from fgc_runtime.optim import Adafactor, AdamW, MuonAdamW, param_groups
from fgc_runtime.train import ScheduleError

from ..context import LoweringContext
from .base import Pass
from .check_types import NOT_PLAIN, plain_value

MUON_TRAINERS = ("basic", "ddp")
# fgc_runtime's optimizers: what each needs of the trainer, and the trainers it works with
RUNTIME_OPTIMIZER_TRAINERS = {
    MuonAdamW: ("the Muon optimizer needs whole weight matrices on every rank", MUON_TRAINERS),
    Adafactor: (
        "fgc_runtime.optim.Adafactor needs whole weight matrices (its second moments are factored over "
        "rows and columns) and its own state dict in checkpoints",
        ("basic", "ddp"),
    ),
    AdamW: (
        "fgc_runtime.optim.AdamW needs its own state dict in checkpoints (it holds the "
        "stochastic-rounding generators)",
        ("basic", "ddp"),
    ),
}


# fgc_runtime's optimizers that step plain tensors only: why each cannot take tensor-parallel weights
NOT_TENSOR_PARALLEL = {
    Adafactor: "fgc_runtime.optim.Adafactor needs whole weight matrices (its second moments are factored over "
    "rows and columns)",
    AdamW: "fgc_runtime.optim.AdamW rounds plain tensors stochastically",
}


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
        self._optimizer_values(ir, ctx, node, obj)
        rounding = node.kwargs.get("bf16_stochastic_round")

        def blame(cls):
            # the template picks this AdamW for bf16_stochastic_round: point at that line
            return ir.node(rounding).loc if cls is AdamW and rounding is not None else node.loc

        for cls, (why, trainers) in RUNTIME_OPTIMIZER_TRAINERS.items():
            if isinstance(obj, type) and issubclass(obj, cls) and ctx.plan.trainer_type not in trainers:
                ctx.sink.error(
                    f"{why}: it works with the {' and '.join(trainers)} trainers, not {ctx.plan.trainer_type}",
                    blame(cls),
                )
                break
        else:
            tensor_parallel = ctx.plan.tensor_parallel
            for cls, why in NOT_TENSOR_PARALLEL.items() if tensor_parallel else ():
                if isinstance(obj, type) and issubclass(obj, cls):
                    ctx.sink.error(
                        f"{why}, but tensor_degree {tensor_parallel['degree']} shards the weights across ranks "
                        "(DTensors): it works with tensor_degree 1",
                        blame(cls),
                    )
                    break
        precision = ctx.settings.precision.mode
        if rounding is not None and ir.node(rounding).kind == "value" and ir.node(rounding).value is True:
            if precision != "bf16":
                ctx.sink.error(
                    f"bf16_stochastic_round rounds bf16 weights, but precision {precision} keeps the "
                    "weights in fp32: it would do nothing",
                    ir.node(rounding).loc,
                    hint="use precision bf16 (bf16 weights), or leave bf16_stochastic_round off",
                )

    @staticmethod
    def _optimizer_values(ir: IRGraph, ctx: LoweringContext, node, obj) -> None:
        """Build the optimizer on one dummy parameter: its own checks of its values, at build time."""
        if node.kind != "call" or node.args or not (isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer)):
            return
        kwargs = {key: plain_value(ir, child) for key, child in node.kwargs.items()}
        if any(v is NOT_PLAIN for v in kwargs.values()):
            return  # a computed argument: nothing to check before run time

        def build(values: dict) -> None:
            params = param_groups(torch.nn.Linear(2, 2), (), with_names=getattr(obj, "needs_param_names", False))
            obj(params, **values)

        try:
            build(kwargs)
        except (ValueError, TypeError) as err:
            # the argument to blame is the one whose default makes the optimizer build
            blamed = node.loc
            for key in kwargs:
                try:
                    build({k: v for k, v in kwargs.items() if k != key})
                except (ValueError, TypeError):
                    continue
                blamed = ir.node(node.kwargs[key]).loc
                break
            ctx.sink.error(f"optimizer: {err}", blamed)

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

        if ctx.plan.pipeline:
            ctx.sink.error(
                "text samples need the whole model on a rank: not available with pipeline stages",
                loc("sample_every"),
            )
