"""Bind every ``!var`` to its ``-D`` value or its default; a ``!var`` that the config's
``dynamic_args`` declares as a train.py flag is bound to its build-time value too, and recorded
(``ctx.dynamic_args``) so that codegen emits the parsed flag in its place
(:mod:`fgc_lowering.dynamic_args`)."""

from __future__ import annotations

import difflib

from fgc.errors import Location
from fgc.ir import IRGraph, Node

from .. import dynamic_args
from ..context import LoweringContext
from .base import Pass


class ResolveVariables(Pass):
    name = "resolve-variables"
    purpose = "bind every !var to its -D value or its default"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        ir = ir.copy()
        self._check_defines_are_used(ir, ctx)
        ctx.dynamic_args = dynamic_args.parse_declarations(ir, ctx)
        for node in ir.nodes():
            if node.kind != "var" or node.id not in ir.g:
                continue
            if node.value in ctx.dynamic_args:  # a flag: its build-time value, replaced at run time
                bound = dynamic_args.bind(ir, ctx, node, ctx.dynamic_args[node.value])
                if bound is not None:
                    ir.add(bound)
                    ir.link(bound)
            elif node.value in ctx.variables:
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
        dynamic_args.check_unused(ir, ctx)
        # defaults of variables bound by -D are no longer part of the config
        roots = list(ir.targets.values()) + list(ir.definitions.values())
        live = {n for r in roots for n in ir.reachable(r)}
        ir.g.remove_nodes_from([n for n in list(ir.g.nodes) if n not in live])
        return ir

    @staticmethod
    def _check_defines_are_used(ir: IRGraph, ctx: LoweringContext) -> None:
        """A -D that no template and no !var reads is a typo'd knob: an error, never ignored."""
        if ctx.template_names is None:
            return
        used = set(ctx.template_names) | {n.value for n in ir.nodes() if n.kind == "var"}
        for name in sorted(set(ctx.variables) - used):
            close = difflib.get_close_matches(name, sorted(used), n=1)
            ctx.sink.error(
                f"-D {name}: no template or !var of this config uses {name!r}",
                Location("<command line>"),
                hint=f"did you mean {close[0]!r}?" if close else None,
            )

    @staticmethod
    def _redirect(ir: IRGraph, old: str, new: str) -> None:
        """Point every reference to ``old`` at ``new`` and drop ``old``."""
        for parent_id in list(ir.g.predecessors(old)):
            parent = ir.node(parent_id)
            parent.args = [new if c == old else c for c in parent.args]
            parent.kwargs = {k: (new if c == old else c) for k, c in parent.kwargs.items()}
            if parent.default == old:
                parent.default = new
            ir.link(parent)
        for table in (ir.targets, ir.definitions):
            for key, nid in table.items():
                if nid == old:
                    table[key] = new
        ir.g.remove_node(old)
