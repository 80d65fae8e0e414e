"""Check every scalar argument against the annotation of the parameter it binds to, its range
(``Annotated[int, Range(ge=1)]``) included."""

from __future__ import annotations

from fgc.ir import IRGraph

from ..context import LoweringContext
from ..types import describe, range_violation, signature_hints, value_ok
from .base import Pass, resolved_calls


def plain_value(ir: IRGraph, node_id: str):
    """The Python value of a value node or a list/tuple of value nodes; a sentinel otherwise."""
    node = ir.node(node_id)
    if node.kind == "value":
        return node.value
    if node.kind in ("list", "tuple"):
        items = [plain_value(ir, c) for c in node.args]
        if any(i is NOT_PLAIN for i in items):
            return NOT_PLAIN
        return items if node.kind == "list" else tuple(items)
    return NOT_PLAIN


NOT_PLAIN = object()  # what plain_value gives for a node that is not plain data


class CheckTypes(Pass):
    name = "check-types"
    purpose = "check scalar arguments against the annotations of the parameters they bind to"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        for node, symbol, sig in resolved_calls(ir, ctx):
            hints = signature_hints(symbol.obj)
            if not hints:
                continue
            try:
                bound = sig.bind_partial(*node.args, **node.kwargs)
            except TypeError:
                continue  # bind-arguments has reported it
            by_param = {p.name: p for p in sig.parameters.values()}
            for pname, arg in bound.arguments.items():
                param = by_param[pname]
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or pname not in hints:
                    continue
                for child in arg if param.kind is param.VAR_POSITIONAL else [arg]:
                    value = plain_value(ir, child)
                    if value is NOT_PLAIN or value_ok(value, hints[pname]):
                        continue
                    bounds = range_violation(value, hints[pname])
                    if bounds is not None:  # the right type, out of range
                        message = f"{pname} must be {bounds.describe()}, got {value!r}"
                    else:
                        owner = getattr(symbol.obj, "__qualname__", node.spec)
                        message = f"{owner}.{pname} must be {describe(hints[pname])}, got {value!r}"
                    ctx.sink.error(message, ir.node(child).loc)
        return ir
