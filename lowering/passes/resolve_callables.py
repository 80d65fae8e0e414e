"""Import every callable the config names."""

from __future__ import annotations

from pathlib import Path

from fgc.ir import IRGraph

from ..context import LoweringContext
from ..specs import SpecError, resolve_spec
from .base import Pass


class ResolveCallables(Pass):
    name = "resolve-callables"
    purpose = "import every callable spec with the one resolver that generated code also uses"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        for node in ir.nodes():
            if node.kind != "call":
                continue
            try:
                symbol = resolve_spec(node.spec, Path(node.loc.file), ctx.search_path)
            except SpecError as exc:
                ctx.sink.error(str(exc), node.loc, exc.hint)
                continue
            if not callable(symbol.obj):
                ctx.sink.error(f"{node.spec!r} is not callable", node.loc)
                continue
            ctx.symbols[node.id] = symbol
        return ir
