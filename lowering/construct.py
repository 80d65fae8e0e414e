"""Build-time construction of a subgraph (used for plain-data nodes such as trainer settings).

Semantics are the config's: a singleton is called once, a factory anew at each use, a partial
becomes ``functools.partial``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

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


@contextlib.contextmanager
def without_dynamo() -> Iterator[None]:
    """Build-time construction that does not import ``torch._dynamo``.

    torch marks some methods ``torch._disable_dynamo`` (``Optimizer.add_param_group``, which every
    optimizer's constructor calls); the first call of one imports torch._dynamo (over a second on
    this machine) only to exclude the method from tracing. Nothing is traced at build time, so
    while this is active such a method runs as it is; on exit the methods are as before.
    """
    import torch
    import torch._compile

    marker = torch._compile._disable_dynamo(lambda: None).__code__
    owners = [torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]
    patched = []
    for owner in owners:
        for attr in vars(owner).values():
            fn = getattr(attr, "__wrapped__", None)
            # the wrapper caches the disabled function under this name and imports nothing once set
            if getattr(attr, "__code__", None) is marker and fn is not None and not hasattr(fn, "__dynamo_disable"):
                setattr(fn, "__dynamo_disable", fn)
                patched.append(fn)
    try:
        yield
    finally:
        for fn in patched:
            with contextlib.suppress(AttributeError):
                delattr(fn, "__dynamo_disable")


def checked_meta_model(ir: IRGraph, ctx: LoweringContext):
    """The model target built on the meta device; None (and an error) when it does not build."""
    try:
        return meta_model(ir, ctx)
    except Exception as exc:
        ctx.sink.error(
            f"the model does not build: {type(exc).__name__}: {exc}", ir.node(ir.targets["model"]).loc
        )
        return None
