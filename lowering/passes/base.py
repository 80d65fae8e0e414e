"""What every pass is: a named step with a one-line purpose, IR in, IR out."""

from __future__ import annotations

import inspect

from fgc.ir import IRGraph

from ..context import LoweringContext


class Pass:
    """A lowering pass. Subclasses set ``name`` and ``purpose`` and implement :meth:`run`."""

    name: str = ""
    purpose: str = ""
    needs_clean_input: bool = False  # True: skipped once an earlier pass has reported errors

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        raise NotImplementedError  # abstract: every concrete pass overrides it


def resolved_calls(ir: IRGraph, ctx: LoweringContext):
    """(node, symbol, signature) for every call whose callable resolved and has a signature."""
    for node in ir.nodes():
        symbol = ctx.symbols.get(node.id)
        if node.kind != "call" or symbol is None:
            continue
        try:
            sig = inspect.signature(symbol.obj)
        except (TypeError, ValueError):
            continue  # a builtin without a signature: nothing to check against
        yield node, symbol, sig
