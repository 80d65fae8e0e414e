"""What every pass is: a named step with a one-line purpose, IR in, IR out."""

from __future__ import annotations

from fgc.ir import IRGraph

from ..context import LoweringContext


class Pass:
    """A lowering pass. Subclasses set ``name`` and ``purpose`` and implement :meth:`run`."""

    name: str = ""
    purpose: str = ""
    needs_clean_input: bool = False  # True: skipped once an earlier pass has reported errors

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        raise NotImplementedError  # abstract: every concrete pass overrides it
