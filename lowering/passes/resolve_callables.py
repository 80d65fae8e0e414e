"""Import every callable the config names."""

from __future__ import annotations

from pathlib import Path

from fgc.ir import IRGraph

from ..context import LoweringContext
from ..forgather_trainers import port_forgather_trainers
from ..meta import expand_meta, is_meta
from ..specs import SpecError, resolve_spec, take_module_path
from .base import Pass


class ResolveCallables(Pass):
    name = "resolve-callables"
    purpose = "import every callable spec with the one resolver that generated code also uses"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        # Forgather's trainer classes become fgc's trainer settings (one registered table) before
        # anything is imported: forgather need not be installed to build a ported config
        ir = port_forgather_trainers(ir, ctx)
        # Forgather's submodule_searchpath: where the config's .module:Symbol specs are found
        module_path = take_module_path(ir, ctx.sink)
        for node in ir.nodes():
            if node.kind != "call" or is_meta(node):
                continue
            try:
                symbol = resolve_spec(node.spec, Path(node.loc.file), ctx.search_path, module_path)
            except SpecError as exc:
                ctx.sink.error(str(exc), node.loc, exc.hint)
                continue
            if not callable(symbol.obj):
                ctx.sink.error(f"{node.spec!r} is not callable", node.loc)
                continue
            ctx.symbols[node.id] = symbol
        # !meta nodes last: their functions read the graph below them, its callables resolved
        return expand_meta(ir, ctx)
