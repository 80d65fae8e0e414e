"""Build-time construction of a subgraph (used for plain-data nodes such as trainer settings).

Semantics are the config's: a singleton is called once, a factory anew at each use, a partial
becomes ``functools.partial``.
"""

from __future__ import annotations

import functools
from typing import Any

from fgc.ir import IRGraph

from .context import LoweringContext


def construct(ir: IRGraph, ctx: LoweringContext, node_id: str) -> Any:
    """The Python object the config describes at ``node_id``."""
    memo: dict[str, Any] = {}

    def build(nid: str) -> Any:
        node = ir.node(nid)
        if node.kind == "value":
            return node.value
        if node.kind == "list":
            return [build(c) for c in node.args]
        if node.kind == "tuple":
            return tuple(build(c) for c in node.args)
        if node.kind == "dict":
            return {k: build(c) for k, c in node.kwargs.items()}
        if node.kind == "call":
            if node.mode == "singleton" and nid in memo:
                return memo[nid]
            fn = ctx.symbols[nid].obj
            args = [build(c) for c in node.args]
            kwargs = {k: build(c) for k, c in node.kwargs.items()}
            if node.mode == "partial":
                result = functools.partial(fn, *args, **kwargs)
            else:
                result = fn(*args, **kwargs)
            if node.mode == "singleton":
                memo[nid] = result
            return result
        raise ValueError(f"cannot construct a {node.kind} node ({nid})")

    return build(node_id)


def meta_model(ir: IRGraph, ctx: LoweringContext):
    """The model target built on the meta device (no memory, no initialisation), once per
    lowering: later calls return the same module, or raise the same exception again."""
    if ctx.meta_model is None:
        import torch

        from fgc.codegen.smoke import skip_init

        with torch.device("meta"), skip_init():
            try:
                ctx.meta_model = construct(ir, ctx, ir.targets["model"])
            except Exception as exc:  # the model's own error, reported by each caller its way
                ctx.meta_model = exc
    if isinstance(ctx.meta_model, Exception):
        raise ctx.meta_model
    return ctx.meta_model
