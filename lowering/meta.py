"""``!meta`` nodes: build-time functions given the unbuilt graph of their arguments.

Forgather calls a ``!meta:module:function`` with its arguments as graph nodes, not as built
objects, so the function can turn a graph into something else (its one use in Forgather's library
is ``forgather.codegen:generate_code``, which writes a model's Python source from the graph).
fgc runs no project code while it compiles, so a ``!meta`` node is carried out by a function fgc
registers for its spec, here, in :data:`META_FUNCTIONS`; any other spec is an error at its line.

The resolve-callables pass calls :func:`expand_meta` after it has resolved every other callable:
each registered function replaces its node with a plain value node, so the passes after it see
an ordinary graph.
"""

from __future__ import annotations

from typing import Callable

from fgc.errors import display_path
from fgc.ir import IRGraph, Node

from .context import LoweringContext

# generate_code's keywords that fgc reads; Forgather passes any other keyword to the code template
_GENERATE_CODE_KEYWORDS = ("obj", "name_policy", "template_name", "template_str", "searchpath", "env")
_NAME_POLICIES = ("required", "named", "all")


def _generate_code(ir: IRGraph, node: Node, ctx: LoweringContext) -> str | None:
    """``forgather.codegen:generate_code``: the Python source of a module whose ``construct()``
    builds the ``obj`` argument as the config says (what ``fgc code`` writes for a target)."""
    from fgc.inspect import construction_module  # fgc.inspect imports the lowering pipeline

    errors = len(ctx.sink.errors)
    given = {f"arg{i}": c for i, c in enumerate(node.args)} | dict(node.kwargs)
    obj = given.pop("arg0", None) or given.pop("obj", None)
    if obj is None:
        ctx.sink.error("generate_code needs the graph to write: obj: *node", node.loc)
        return None
    for key in sorted(given):
        where = node.key_locs.get(key, node.loc)
        if key == "name_policy":
            policy = ir.node(given[key])
            if policy.kind != "value" or policy.value not in _NAME_POLICIES:
                ctx.sink.error(f"name_policy must be one of {', '.join(_NAME_POLICIES)}", where)
            # fgc names what is shared or @named, whatever the policy: the code is the same program
            continue
        if key in ("template_name", "template_str", "searchpath", "env"):
            ctx.sink.error(
                f"generate_code's {key} is not supported: fgc writes its own construction module (as "
                "`fgc code` does), not Forgather's code templates",
                where,
                hint="remove template_name, template_str, searchpath and the template's arguments; "
                "to train the model, make `model` the model's own node (model: *model_factory)",
            )
            continue
        ctx.sink.error(
            f"generate_code has no argument {key!r} in fgc (Forgather passes it to a code template, "
            "which fgc does not render)",
            where,
        )
    if len(ctx.sink.errors) > errors:
        return None
    scratch = ir.copy()
    # named as the written graph names it: its @name, else its key; `obj` for a bare .define
    target = ir.node(obj).name or obj.lstrip(".").rsplit(".", 1)[-1]
    target = "obj" if target == "define" else target
    scratch.targets = {target: obj}
    # the obj's callables were resolved with the rest of the graph (expand_meta runs after)
    return construction_module(scratch, ctx, [target], display_path(node.loc.file))


# spec as Forgather writes it -> the function fgc runs in its place (ir, node, ctx) -> the value
META_FUNCTIONS: dict[str, Callable[[IRGraph, Node, LoweringContext], object]] = {
    "forgather.codegen:generate_code": _generate_code,
}


def is_meta(node: Node) -> bool:
    """Whether the node is a ``!meta`` call."""
    return node.kind == "call" and node.mode == "meta"


def expand_meta(ir: IRGraph, ctx: LoweringContext) -> IRGraph:
    """Replace every ``!meta`` node by the value its registered function gives; an unregistered
    spec is an error at the node's line."""
    for node in [n for n in ir.nodes() if is_meta(n)]:
        func = META_FUNCTIONS.get(node.spec or "")
        if func is None:
            ctx.sink.error(
                f"!meta:{node.spec} would run {node.spec} while compiling, on the unbuilt graph; fgc "
                "runs no project code at build time",
                node.loc,
                hint="fgc carries out these !meta functions itself: " + ", ".join(sorted(META_FUNCTIONS)),
            )
            continue
        errors = len(ctx.sink.errors)
        value = func(ir, node, ctx)
        if len(ctx.sink.errors) > errors:
            continue
        bound = Node(node.id, "value", node.loc, name=node.name, value=value)
        ir.add(bound)
        ir.link(bound)
    return ir
