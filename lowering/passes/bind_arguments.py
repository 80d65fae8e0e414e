"""Bind each call's arguments to its callable's signature (closed world: no key is ignored)."""

from __future__ import annotations

import difflib
from fgc.ir import IRGraph

from ..context import LoweringContext
from .base import Pass, resolved_calls


class BindArguments(Pass):
    name = "bind-arguments"
    purpose = "check every positional and keyword argument against the callable's signature"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        for node, symbol, sig in resolved_calls(ir, ctx):
            params = sig.parameters
            takes_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
            bad = False
            if not takes_var_kw:
                names = [
                    n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                ]
                for key in node.kwargs:
                    if key not in names:
                        bad = True
                        close = difflib.get_close_matches(key, names, n=1)
                        ctx.sink.error(
                            f"{node.spec} has no parameter {key!r}",
                            node.key_locs.get(key, node.loc),
                            hint=f"did you mean {close[0]!r}?" if close
                            else "parameters: " + ", ".join(names),
                        )
            if bad:
                continue
            marker = object()
            binder = sig.bind_partial if node.mode == "partial" else sig.bind
            try:
                binder(*[marker] * len(node.args), **{k: marker for k in node.kwargs})
            except TypeError as exc:
                ctx.sink.error(f"{node.spec}: {exc}", node.loc)
        return ir
