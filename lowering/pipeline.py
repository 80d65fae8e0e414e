"""The lowering pipeline, in one place. Each pass: IR in, IR out, errors into the context's sink."""

from __future__ import annotations

from typing import Callable

from fgc.ir import IRGraph

from .context import LoweringContext
from .passes.bind_arguments import BindArguments
from .passes.check_optimization import CheckOptimization
from .passes.check_types import CheckTypes
from .passes.validate_model import ValidateModel
from .passes.plan_training import PlanTraining
from .passes.resolve_callables import ResolveCallables
from .passes.resolve_variables import ResolveVariables
from .passes.select_kernels import SelectKernels

PASSES = (
    ResolveVariables(),  # bind every !var to its -D value or its default
    ResolveCallables(),  # import every callable spec
    BindArguments(),  # check arguments against signatures
    CheckTypes(),  # check scalar arguments against parameter annotations
    ValidateModel(),  # cross-field checks of the model's shape
    PlanTraining(),  # typed trainer settings -> the plan codegen reads
    SelectKernels(),  # each kernel's implementation, from capabilities
    CheckOptimization(),  # the lr schedule's budgets, the optimizer's trainer, samples
)

PASS_NAMES = tuple(p.name for p in PASSES)

# What `fgc code` and `fgc graph --format python` need: callables checked, !vars left as parameters.
CODE_PASSES = (ResolveCallables(), BindArguments(), CheckTypes())


def lower(
    ir: IRGraph,
    ctx: LoweringContext,
    dump_after: str | None = None,
    dump: Callable[[str], None] = print,
    passes: tuple = PASSES,
) -> IRGraph:
    """Run the passes in order, collecting every independent error; a pass that needs a clean
    graph does not run after errors. Raises FgcError with all errors found."""
    for p in passes:
        if ctx.sink.errors and p.needs_clean_input:
            break
        ir = p.run(ir, ctx)
        if dump_after == p.name:
            dump(f"# IR after {p.name}: {p.purpose}\n{ir.dump()}")
            program = ctx.program(ir)
            dump(
                f"# training program after {p.name}\n{program.dump()}"
                if program is not None
                else f"# training program after {p.name}: not planned yet (the plan-training pass makes it)"
            )
    if ctx.sink.errors:
        ctx.sink.raise_if_errors()
    return ir
