"""The Qwen2 family: transformers' Qwen2ForCausalLM, a Llama whose attention has biases on the q, k
and v projections (none on o_proj, none in the MLP), with transformers 5's optional
sliding-window layers (``use_sliding_window``, ``max_window_layers``, ``layer_types``).

This module also holds :func:`layered_llama_style`, which the SmolLM3 and Granite families use
too: it recognises a model of the library's Llama-style parts whose layers may differ in their
window and rotary, and reads every option that changes the function of its parts, so that an
export never describes a model other than the one trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope

LAYER_TYPES = ("full_attention", "sliding_attention")

# the component library's parts a Llama-style model is made of, by class name -> module
_LIBRARY = {
    "CausalLM": "fgc.components.causal_lm",
    "DecoderStack": "fgc.components.causal_lm",
    "PreNormDecoderLayer": "fgc.components.layers",
    "CausalSelfAttention": "fgc.components.attention",
    "SwiGLUMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
}
_TORCH = {"Embedding", "Linear", "ModuleList"}


@dataclass(frozen=True)
class Layered:
    """What a Llama-style model with per-layer windows and rotary has: the config.json fields
    every such family writes (``fields``), each layer's window (None: full attention) and whether
    it rotates, the biases, and the scalars Granite sets (None or 1.0 where the model has none).
    """

    fields: dict
    windows: tuple
    rope: tuple
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    layer_class: str
    scaling: float | None
    residual_multiplier: float
    embedding_multiplier: float
    logits_scaling: float


def _cls(module) -> tuple[str, str]:
    return type(module).__name__, type(module).__module__


def layered_llama_style(
    model, source: dict | None, layer_class: tuple[str, str] | None = None
) -> Layered | None:
    """MODEL (built on the meta device) as a Llama-style model whose layers may differ in their
    sliding window and rotary only, or None when it is not one. Its parts are the component
    library's (or, for the decoder layers, LAYER_CLASS: ``(class name, module)`` of a family's
    layer with the library layer's children); a rotary embedding other than the default one
    counts only when the model was imported (its parameters are then SOURCE's). Options of the
    parts that no such family has (soft-capping, partial rotary, an RMSNorm offset, a biased
    head) make it None."""
    layer_kind = layer_class or ("PreNormDecoderLayer", _LIBRARY["PreNormDecoderLayer"])
    for module in model.modules():
        name, mod = _cls(module)
        library = _LIBRARY.get(name) == mod and name != "PreNormDecoderLayer"
        rotary = mod == _LIBRARY["RotaryEmbedding"] and source is not None
        torch_part = mod.startswith("torch.nn") and name in _TORCH
        if not (library or rotary or torch_part or (name, mod) == layer_kind):
            return None
    if _cls(model) != ("CausalLM", _LIBRARY["CausalLM"]) or not len(model.model.layers):
        return None
    if model.lm_head.bias is not None or model.final_logit_softcapping is not None:
        return None
    layers = list(model.model.layers)
    if any(_cls(layer) != layer_kind for layer in layers):
        return None
    attns, mlps, rotary = (
        [layer.self_attn for layer in layers],
        [layer.mlp for layer in layers],
        model.model.positions,
    )
    norms = [m for m in model.modules() if _cls(m) == ("RMSNorm", _LIBRARY["RMSNorm"])]
    if any(
        _cls(a) != ("CausalSelfAttention", _LIBRARY["CausalSelfAttention"])
        for a in attns
    ):
        return None
    if any(_cls(m) != ("SwiGLUMLP", _LIBRARY["SwiGLUMLP"]) for m in mlps):
        return None

    def one(values) -> bool:
        return len(set(values)) == 1

    a, mlp = attns[0], mlps[0]
    biased = [
        (
            x.q_proj.bias is not None,
            x.k_proj.bias is not None,
            x.v_proj.bias is not None,
        )
        for x in attns
    ]
    if not (
        one(
            (
                x.num_attention_heads,
                x.num_key_value_heads,
                x.head_dim,
                x.q_norm is None,
                x.scaling,
            )
            for x in attns
        )
        and all(
            x.attn_logit_softcapping is None and x.rotary_dim is None for x in attns
        )
        and one(x.attention_dropout for x in attns)
        and one(biased)
        and len(set(biased[0])) == 1
        and one(x.o_proj.bias is not None for x in attns)
        and one(m.intermediate_size for m in mlps)
        and all(
            len({lin.bias is not None for lin in (m.gate_proj, m.up_proj, m.down_proj)})
            == 1
            for m in mlps
        )
        and one(m.gate_proj.bias is not None for m in mlps)
        and one(n.eps for n in norms)
        and all(n.offset == 0.0 for n in norms)
        and rotary.head_dim == a.head_dim
        and one(getattr(layer, "residual_multiplier", 1.0) for layer in layers)
    ):
        return None
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlp.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": rotary.max_position_embeddings,
        "rms_norm_eps": norms[0].eps,
        "rope_parameters": {
            "rope_theta": float(rotary.rope_theta),
            "rope_type": "default",
        },
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        # dropout on the attention weights while training, as transformers' attention applies it
        "attention_dropout": float(a.attention_dropout),
        "initializer_range": model.initializer_range,
    }
    embedding_multiplier = model.model.embedding_multiplier
    return Layered(
        fields=fields,
        windows=tuple(x.sliding_window for x in attns),
        rope=tuple(bool(x.use_rope) for x in attns),
        qkv_bias=biased[0][0],
        o_bias=a.o_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
        qk_norm=a.q_norm is not None,
        layer_class=layer_kind[0],
        scaling=a.scaling,
        residual_multiplier=float(getattr(layers[0], "residual_multiplier", 1.0)),
        embedding_multiplier=(
            1.0 if embedding_multiplier is None else float(embedding_multiplier)
        ),
        logits_scaling=float(model.logits_scaling),
    )


def sliding_fields(windows: tuple) -> dict | None:
    """``use_sliding_window``, ``sliding_window`` and ``layer_types`` for the layers' WINDOWS
    (None: full attention), or None when the sliding layers' windows differ (a config.json has
    one ``sliding_window``)."""
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        return None
    return {
        "use_sliding_window": bool(sizes),
        "sliding_window": sizes.pop() if sizes else None,
        "layer_types": [LAYER_TYPES[w is not None] for w in windows],
    }


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layer_types(config: dict, family: str, window) -> str | None:
    """``layer_types`` of CONFIG, when given: one of LAYER_TYPES per layer, a sliding layer only
    with a window (WINDOW: the one transformers gives sliding layers, or None)."""
    types = config.get("layer_types")
    if types is None:
        return None
    n = config["num_hidden_layers"]
    if not isinstance(types, list) or len(types) != n:
        count = f"{len(types)} entries" if isinstance(types, list) else repr(types)
        return f"layer_types has {count}, but num_hidden_layers is {n}: it needs one entry per layer"
    other = [t for t in types if t not in LAYER_TYPES]
    if other:
        return f"layer_types has {other[0]!r}; fgc's {family} template has only {' and '.join(LAYER_TYPES)} layers"
    if "sliding_attention" in types and window is None:
        return (
            "layer_types has 'sliding_attention', but use_sliding_window is not true or sliding_window is null: "
            f"such a layer has no window fgc's {family} template could give it"
        )
    return None


def check(config: dict) -> str | None:
    """Qwen2's rules: the rope type and integer sizes (as Llama's), and its sliding-window
    layers as transformers 5 decides them (``sliding_window`` only with ``use_sliding_window``;
    ``layer_types``, or else the layers from ``max_window_layers`` on, slide)."""
    problem = check_rope(config)
    if problem is not None:
        return problem
    window = (
        config.get("sliding_window", 4096)
        if config.get("use_sliding_window", False)
        else None
    )
    if window is not None and (not _is_int(window) or window < 1):
        return f"sliding_window must be a positive integer, got {window!r}"
    if not _is_int(config.get("max_window_layers", 28)):
        return (
            f"max_window_layers must be an integer, got {config['max_window_layers']!r}"
        )
    return check_layer_types(config, "qwen2", window)


def export_fields(model, source):
    """A Llama-style model with biases on q, k and v only (transformers' Qwen2 has no others),
    without QK-norm, each layer with full attention or one sliding window."""
    found = layered_llama_style(model, source)
    if (
        found is None
        or found.qk_norm
        or not found.qkv_bias
        or found.o_bias
        or found.mlp_bias
    ):
        return None
    if (
        found.scaling is not None
        or found.embedding_multiplier != 1.0
        or found.logits_scaling != 1.0
    ):
        return None
    sliding = sliding_fields(found.windows)
    if sliding is None or not all(found.rope):
        return None
    # transformers' default rule gives the layers from max_window_layers on a window: the first
    # sliding layer is the one this model's layer_types also says
    first = next(
        (i for i, w in enumerate(found.windows) if w is not None), len(found.windows)
    )
    return {**found.fields, **sliding, "max_window_layers": first}


SPEC = FamilySpec(
    name="qwen2",
    model_type="qwen2",
    architecture="Qwen2ForCausalLM",
    folder=Path(__file__).parent,
    # Qwen2's biases are fixed (q, k, v: yes; o, MLP: no): its config class has no attention_bias
    # or mlp_bias, and transformers' Qwen2 does not read them (ignored with a note)
    knobs=(LLAMA_KNOBS - {"attention_bias", "mlp_bias"})
    | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"},
    fixed=LLAMA_FIXED,
    check=check,
    export_fields=export_fields,
)
