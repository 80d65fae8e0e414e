"""A decision of the plan-training pass: tensor parallelism. Whether the model can be split
over ``tensor_degree`` ranks (the parts' ``tp_plan`` and ``tp_divisible``), and the plan's
account of what is split and what stays whole."""

from __future__ import annotations

from fgc.ir import IRGraph

from .construct import checked_meta_model
from .context import LoweringContext


def tp_styles(model) -> dict:
    """The plan's account of tensor parallelism: the projections the decoder layers' parts
    split column-wise and row-wise (as their ``tp_plan`` names them, each name once, in the
    order of the first layer), and what stays whole."""
    from fgc_runtime.parallel import layer_tp_plan

    styles: dict[str, list[str]] = {"colwise": [], "rowwise": []}
    whole: list[str] = []
    for layer in model.decoder_layers():
        plan = layer_tp_plan(layer)
        for name, style in plan.items():
            leaf = name.split(".")[-1]
            if leaf not in styles.setdefault(style, []):
                styles[style].append(leaf)
        # a layer's part with weights of its own and no projection in the plan (a norm, or
        # a part that declares no tp_plan) stays whole
        for child, module in layer.named_children():
            split = any(name.startswith(child + ".") for name in plan)
            if not split and any(True for _ in module.parameters()) and child not in whole:
                whole.append(child)
    replicated = "embedding, final norm, head"
    if whole:
        replicated += "; in each layer: " + ", ".join(whole)
    return {**styles, "replicated": replicated}

def tensor_parallel_ok(s, ir: IRGraph, ctx: LoweringContext, err, where) -> bool:
    """Check the tensor degree against the world size and the divisibility the decoder layers'
    parts declare (``tp_divisible``: heads, MLP width)."""
    from torch import nn

    from fgc_runtime.parallel import has_method, layer_tp_plan

    degree = s.parallel.tensor_degree
    if s.nproc % degree:
        err(
            "parallel.tensor_degree",
            f"the world size (nproc {s.nproc}) is not divisible by tensor_degree {degree}: the world "
            f"size is the product of the parallel degrees (data-parallel groups x tensor_degree)",
            hint="set nproc to a multiple of tensor_degree",
        )
        return False
    model = checked_meta_model(ir, ctx)
    if model is None:
        return False
    if not has_method(model, "decoder_layers"):
        ctx.sink.error(
            f"tensor parallelism needs the model's decoder_layers(): {type(model).__name__} has no such method",
            ir.node(ir.targets["model"]).loc,
            hint="the component library's CausalLM has it",
        )
        return False
    layers = list(model.decoder_layers())
    for layer in layers:
        plan = layer_tp_plan(layer)
        split = {n: m for n, m in layer.named_modules() if n in plan}
        if not plan:
            err("parallel.tensor_degree", f"tensor parallelism needs decoder layers whose parts declare a "
                f"tp_plan (which projections to split); no part of {type(layer).__name__} does")
            return False
        wrong = [n for n in plan if not isinstance(split.get(n), nn.Linear)]
        bad_styles = sorted({style for style in plan.values() if style not in ("colwise", "rowwise")})
        if wrong or bad_styles:
            ctx.sink.error(
                f"a tp_plan of {type(layer).__name__} names "
                + (f"{', '.join(wrong)}, not Linear submodule(s)" if wrong else "")
                + ("; " if wrong and bad_styles else "")
                + (f"the style(s) {', '.join(bad_styles)}, not colwise or rowwise" if bad_styles else ""),
                ir.node(ir.targets["model"]).loc,
            )
            return False
    ok = True
    seen = set()
    for layer in layers:
        for module in layer.modules():
            for attr in getattr(module, "tp_divisible", ()):
                value = getattr(module, attr, None)
                if isinstance(value, int) and value % degree and attr not in seen:
                    seen.add(attr)
                    what = _TP_SHARES.get(attr, attr)
                    ctx.sink.error(
                        f"{attr} {value} is not divisible by tensor_degree {degree}: each tensor-parallel "
                        f"rank holds an equal share of the {what}",
                        model_setting(ir, attr) or where("parallel", "tensor_degree"),
                    )
                    ok = False
    return ok

def model_setting(ir: IRGraph, key: str):
    """The config line that sets KEY on a component of the model (None when none does)."""
    for node_id in ir.reachable(ir.targets["model"]):
        node = ir.node(node_id)
        if node.kind == "call" and key in node.kwargs:
            return ir.node(node.kwargs[key]).loc
    return None


# what a tensor-parallel rank holds an equal share of, by the attribute a part declares divisible
_TP_SHARES = {
    "num_attention_heads": "attention heads",
    "num_key_value_heads": "key/value heads",
    "intermediate_size": "MLP intermediate size",
}
