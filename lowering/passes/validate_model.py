"""Cross-field checks of the model's shape, each reported at the line of the offending value.

The rules are keyed on the parameter names the component library (and Hugging Face configs) use,
so they apply to any component that takes them:
- sizes and counts (``vocab_size``, ``hidden_size``, ``num_hidden_layers``, heads, ``head_dim``,
  ``intermediate_size``, ``max_position_embeddings``) are at least 1, and ``eps``, ``rms_norm_eps``,
  ``rope_theta`` and ``initializer_range`` are finite and not negative (see :data:`RANGES`): a zero
  width or a negative layer count builds a model that does nothing;
- ``num_attention_heads`` divides the model's ``hidden_size`` (unless ``head_dim`` is given);
- ``num_key_value_heads`` divides ``num_attention_heads``;
- a rotary embedding's ``head_dim`` is even;
- an attention's ``sliding_window`` is at least 1 (or null: no window);
- a rotary embedding's scaling ``factor`` is positive, and a Llama 3 one's ``high_freq_factor``
  is greater than its ``low_freq_factor``;
- every pattern of a model's ``init_rules`` is a valid regular expression.
"""

from __future__ import annotations

import re

from fgc.ir import IRGraph

from ..context import LoweringContext
from ..types import Range
from .base import Pass

_SIZE = Range(ge=1)
# the range of each numeric model argument, by the name the component library gives it
RANGES = {
    "vocab_size": _SIZE,
    "hidden_size": _SIZE,
    "num_hidden_layers": _SIZE,
    "num_attention_heads": _SIZE,
    "num_key_value_heads": _SIZE,
    "head_dim": _SIZE,
    "intermediate_size": _SIZE,
    "max_position_embeddings": _SIZE,
    "eps": Range(ge=0),
    "rms_norm_eps": Range(ge=0),
    "rope_theta": Range(gt=0),
    "initializer_range": Range(ge=0),
}


def _number_arg(ir: IRGraph, node, key: str):
    child = node.kwargs.get(key)
    if child is None:
        return None, None
    value = ir.node(child)
    if value.kind != "value" or not isinstance(value.value, (int, float)) or isinstance(value.value, bool):
        return None, None
    return value.value, value.loc


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
    purpose = "check the model's shape across fields: heads, KV heads, head_dim, windows, rope factors"

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
            if not self._ranges_ok(ir, node, ctx):
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
            window, window_loc = _int_arg(ir, node, "sliding_window")
            if window is not None and window < 1:
                ctx.sink.error(
                    f"sliding_window must be at least 1, got {window}",
                    window_loc,
                    hint="a token sees itself and the sliding_window - 1 tokens before it; null means no window",
                )
            if "rope_theta" in node.kwargs:
                self._check_rope_scaling(ir, node, ctx)
            if "init_rules" in node.kwargs:
                self._check_init_rules(ir, ir.node(node.kwargs["init_rules"]), ctx)
        return ir

    @staticmethod
    def _ranges_ok(ir: IRGraph, node, ctx: LoweringContext) -> bool:
        """Report every argument of NODE outside its range in :data:`RANGES`; whether there was none."""
        ok = True
        for key, bounds in RANGES.items():
            value, loc = _number_arg(ir, node, key)
            if value is not None and not bounds.contains(value):
                ctx.sink.error(f"{key} must be {bounds.describe()}, got {value!r}", loc)
                ok = False
        return ok

    @staticmethod
    def _check_rope_scaling(ir: IRGraph, node, ctx: LoweringContext) -> None:
        factor, factor_loc = _number_arg(ir, node, "factor")
        if factor is not None and factor <= 0:
            ctx.sink.error(f"rope scaling factor must be positive, got {factor}", factor_loc)
        low, _ = _number_arg(ir, node, "low_freq_factor")
        high, high_loc = _number_arg(ir, node, "high_freq_factor")
        if low is not None and high is not None and high <= low:
            ctx.sink.error(
                f"high_freq_factor ({high}) must be greater than low_freq_factor ({low})", high_loc
            )

    @staticmethod
    def _check_init_rules(ir: IRGraph, rules, ctx: LoweringContext) -> None:
        if rules.kind not in ("list", "tuple"):
            return
        for rule_id in rules.args:
            rule = ir.node(rule_id)
            if rule.kind not in ("list", "tuple") or not rule.args:
                continue
            pattern = ir.node(rule.args[0])
            if pattern.kind != "value" or not isinstance(pattern.value, str):
                continue
            try:
                re.compile(pattern.value)
            except re.error as err:
                ctx.sink.error(f"init_rules pattern {pattern.value!r} is not a valid regex: {err}", pattern.loc)
