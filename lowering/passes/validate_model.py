"""Cross-field checks of the model's shape, each reported at the line of the offending value.

The rules are keyed on the parameter names the component library (and Hugging Face configs) use,
so they apply to any component that takes them:
- ``num_attention_heads`` divides the model's ``hidden_size`` (unless ``head_dim`` is given);
- ``num_key_value_heads`` divides ``num_attention_heads``;
- a rotary embedding's ``head_dim`` is even.
"""

from __future__ import annotations

from fgc.ir import IRGraph

from ..context import LoweringContext
from .base import Pass


def _int_arg(ir: IRGraph, node, key: str):
    child = node.kwargs.get(key)
    if child is None:
        return None, None
    value = ir.node(child)
    if value.kind != "value" or not isinstance(value.value, int) or isinstance(value.value, bool):
        return None, None
    return value.value, value.loc


class ValidateModel(Pass):
    name = "validate-model"
    purpose = "check the model's shape across fields: heads divide the width, KV heads divide heads"

    def run(self, ir: IRGraph, ctx: LoweringContext) -> IRGraph:
        if "model" not in ir.targets:
            return ir
        root = ir.node(ir.targets["model"])
        hidden, _ = _int_arg(ir, root, "hidden_size")
        for nid in ir.reachable(root.id):
            node = ir.node(nid)
            if node.kind != "call":
                continue
            heads, heads_loc = _int_arg(ir, node, "num_attention_heads")
            kv, kv_loc = _int_arg(ir, node, "num_key_value_heads")
            head_dim, head_dim_loc = _int_arg(ir, node, "head_dim")
            width, _ = _int_arg(ir, node, "hidden_size")
            width = width or hidden
            if heads is not None and heads < 1:
                ctx.sink.error(f"num_attention_heads must be at least 1, got {heads}", heads_loc)
                continue
            if heads and width and "head_dim" not in node.kwargs and width % heads:
                ctx.sink.error(
                    f"num_attention_heads ({heads}) does not divide hidden_size ({width})",
                    heads_loc,
                    hint=f"heads that divide {width}: "
                    + ", ".join(str(d) for d in range(1, width + 1) if width % d == 0 and d <= 64),
                )
            if heads and kv is not None and (kv < 1 or heads % kv):
                ctx.sink.error(
                    f"num_key_value_heads ({kv}) does not divide num_attention_heads ({heads})", kv_loc
                )
            if head_dim is not None and "num_attention_heads" not in node.kwargs and head_dim % 2:
                ctx.sink.error(f"rotary head_dim must be even, got {head_dim}", head_dim_loc)
        return ir
