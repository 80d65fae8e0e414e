"""Bind every ``!var`` to its ``-D`` value or its default."""

from __future__ import annotations

from fgc.ir import IRGraph, Node

from ..context import LoweringContext
from .base import Pass


class ResolveVariables(Pass):
    name = "resolve-variables"
    purpose = "bind every !var to its -D value or its default"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        ir = ir.copy()
        for node in ir.nodes():
            if node.kind != "var":
                continue
            if node.value in ctx.variables:
                bound = Node(node.id, "value", node.loc, value=ctx.variables[node.value])
                ir.add(bound)
                ir.link(bound)
            elif node.default is not None:
                self._redirect(ir, node.id, node.default)
            else:
                ctx.sink.error(
                    f"variable {node.value!r} is not bound and has no default",
                    node.loc,
                    hint=f"pass -D {node.value}=VALUE or write !var {{name: {node.value}, default: ...}}",
                )
        return ir

    @staticmethod
    def _redirect(ir: IRGraph, old: str, new: str) -> None:
        """Point every reference to ``old`` at ``new`` and drop ``old``."""
        for parent_id in list(ir.g.predecessors(old)):
            parent = ir.node(parent_id)
            parent.args = [new if c == old else c for c in parent.args]
            parent.kwargs = {k: (new if c == old else c) for k, c in parent.kwargs.items()}
            ir.link(parent)
        for table in (ir.targets, ir.definitions):
            for key, nid in table.items():
                if nid == old:
                    table[key] = new
        ir.g.remove_node(old)
