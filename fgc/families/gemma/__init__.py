"""The Gemma family: transformers' GemmaForCausalLM. A Llama-shaped decoder built from the
component library's parts with Gemma's options: RMSNorm scaling by `1 + weight`, token
embeddings multiplied by sqrt(hidden_size), a GeGLU MLP, and (by default) a tied head.

This module also holds what the three Gemma families share at the Hugging Face boundary
(`gemma_model`, the activation names, the checks); `fgc.families.gemma2` and
`fgc.families.gemma3` use it, and their templates use this folder's parts (`parts.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..base import LLAMA_KNOBS, FamilySpec, check_rope

# transformers' names of the MLP activations the templates build, and GatedMLP's name for each
# ("gelu" is added per family: transformers' Gemma reads it as the tanh GELU, Gemma 2 and 3 as
# the exact one)
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")
# config.json fields every Gemma template reads (Gemma has no mlp_bias; the activation field is
# added per family: hidden_act for Gemma, hidden_activation for Gemma 2 and 3)
GEMMA_KNOBS = LLAMA_KNOBS - {"mlp_bias"}
# fields whose one value the parts represent
GEMMA_FIXED = {"attention_dropout": 0.0}

# the classes a Gemma model is made of, and their modules
_CLASSES = {
    "CausalLM": "fgc.components.causal_lm",
    "DecoderStack": "fgc.components.causal_lm",
    "PreNormDecoderLayer": "fgc.components.layers",
    "CausalSelfAttention": "fgc.components.attention",
    "GatedMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
    "GemmaSandwichDecoderLayer": "fgc.families.gemma.parts",
    "GemmaLayerTypeAttention": "fgc.families.gemma.parts",
    "GemmaLocalGlobalRotary": "fgc.families.gemma.parts",
    "Embedding": "torch.nn.modules.sparse",
    "Linear": "torch.nn.modules.linear",
    "ModuleList": "torch.nn.modules.container",
}


def _is(module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == _CLASSES.get(name)


def check_activation(config: dict, field: str) -> str | None:
    """FIELD (hidden_act or hidden_activation) as an activation the templates build, or the
    problem: the tanh GELU by either of its names, or gelu."""
    value = config.get(field, "gelu_pytorch_tanh")
    supported = (*TANH_GELUS, "gelu")
    if value not in supported:
        return f"{field} is {value!r}, but fgc's Gemma templates support only {', '.join(map(repr, supported))}"
    return None


def check_common(config: dict) -> str | None:
    """What every Gemma family refuses: bidirectional attention (not a causal LM), and what
    base.check_rope refuses (integer sizes)."""
    if config.get("use_bidirectional_attention"):
        return "use_bidirectional_attention is True, but fgc's Gemma templates build causal attention only"
    return check_rope(config)


def check_layer_types(config: dict, default_period: int) -> str | None:
    """Gemma 2's and 3's `layer_types`, `sliding_window`, `query_pre_attn_scalar`: values the
    template builds."""
    layer_types = config.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != config.get(
            "num_hidden_layers"
        ):
            return f"layer_types must be a list of one layer type per layer, got {layer_types!r}"
        other = sorted(
            {t for t in layer_types if t not in ("sliding_attention", "full_attention")}
        )
        if other:
            return f"layer_types has {other[0]!r}; fgc's Gemma templates have sliding_attention and full_attention"
    period = config.get("sliding_window_pattern", default_period)
    if layer_types is None and (
        not isinstance(period, int) or isinstance(period, bool) or period < 1
    ):
        return f"sliding_window_pattern must be a positive integer, got {period!r}"
    window = config.get("sliding_window", 4096)
    sliding = "sliding_attention" in (
        layer_types if layer_types is not None else ["sliding_attention"]
    )
    if window is None and sliding:
        return "sliding_window is null, but the model has sliding_attention layers"
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        return f"sliding_window must be a positive integer or null, got {window!r}"
    scalar = config.get("query_pre_attn_scalar", 256)
    if not isinstance(scalar, (int, float)) or isinstance(scalar, bool) or scalar <= 0:
        return f"query_pre_attn_scalar must be a positive number, got {scalar!r}"
    return None


@dataclass(frozen=True)
class GemmaModel:
    """What a model made of the Gemma parts has: the config.json fields every Gemma family
    writes (`fields`), and the features that tell the families apart."""

    fields: dict
    sandwich: (
        bool  # GemmaSandwichDecoderLayer (Gemma 2, 3), else PreNormDecoderLayer (Gemma)
    )
    layer_type_attention: (
        bool  # GemmaLayerTypeAttention (Gemma 3), else CausalSelfAttention
    )
    qk_norm: bool
    activation: str  # GatedMLP's
    query_pre_attn_scalar: (
        int | float | None
    )  # the softmax scale's, None when not exactly one
    attn_logit_softcapping: float | None
    final_logit_softcapping: float | None
    layer_types: (
        list  # "sliding_attention" where a layer has a window, else "full_attention"
    )
    sliding_window: int | None
    rotary: object  # the positions part: a rotary embedding, or GemmaLocalGlobalRotary
    layer_type_ok: (
        bool  # each GemmaLayerTypeAttention's layer_type agrees with its window
    )


def gemma_model(model, source: dict | None) -> GemmaModel | None:
    """MODEL (built on the meta device) as a model of the Gemma parts, or None when it is not one:
    the library's CausalLM with Gemma's embedding multiplier, offset RMSNorms of one eps, GatedMLPs
    without biases, attention of one shape. A rotary embedding other than the default one counts
    only when the model was imported (its parameters are then the config.json's)."""
    for module in model.modules():
        cls = type(module)
        known = _is(module, cls.__name__)
        scaled_rotary = cls.__module__ == "fgc.components.rotary" and source is not None
        if not (known or scaled_rotary):
            return None
    if (
        not _is(model, "CausalLM")
        or not len(model.model.layers)
        or model.lm_head.bias is not None
    ):
        return None
    if (
        model.logits_scaling != 1.0
        or model.model.embedding_multiplier != model.hidden_size**0.5
    ):
        return None
    layers = list(model.model.layers)
    sandwich = _is(layers[0], "GemmaSandwichDecoderLayer")
    if not all(
        _is(x, "GemmaSandwichDecoderLayer" if sandwich else "PreNormDecoderLayer")
        for x in layers
    ):
        return None
    attns, mlps = [x.self_attn for x in layers], [x.mlp for x in layers]
    typed = _is(attns[0], "GemmaLayerTypeAttention")
    if not all(
        _is(a, "GemmaLayerTypeAttention" if typed else "CausalSelfAttention")
        for a in attns
    ):
        return None
    if not all(_is(m, "GatedMLP") for m in mlps):
        return None
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]

    def same(values) -> bool:
        return len(set(values)) == 1

    a, mlp = attns[0], mlps[0]
    biases = {
        lin.bias is not None
        for x in attns
        for lin in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)
    }
    if not (
        same(
            (
                x.num_attention_heads,
                x.num_key_value_heads,
                x.head_dim,
                x.scaling,
                x.attn_logit_softcapping,
            )
            for x in attns
        )
        and same(x.q_norm is None for x in attns)
        and all(
            x.use_rope and x.rotary_dim is None and x.attention_dropout == 0.0
            for x in attns
        )
        and same((m.intermediate_size, m.activation) for m in mlps)
        and all(
            lin.bias is None
            for m in mlps
            for lin in (m.gate_proj, m.up_proj, m.down_proj)
        )
        and same(n.eps for n in norms)
        and all(n.offset == 1.0 for n in norms)
        and len(biases) == 1
    ):
        return None
    positions = model.model.positions
    rotaries = (
        [positions.local_rotary, positions.global_rotary]
        if _is(positions, "GemmaLocalGlobalRotary")
        else [positions]
    )
    if not all(
        type(r).__module__ == "fgc.components.rotary" and r.head_dim == a.head_dim
        for r in rotaries
    ):
        return None
    windows = {x.sliding_window for x in attns} - {None}
    if len(windows) > 1:
        return None
    layer_types = [
        "sliding_attention" if x.sliding_window is not None else "full_attention"
        for x in attns
    ]
    # the scale as a query_pre_attn_scalar, when one gives it exactly (transformers' is an int)
    scalar = a.head_dim if a.scaling is None else round(a.scaling**-2)
    if scalar**-0.5 != (a.scaling if a.scaling is not None else a.head_dim**-0.5):
        scalar = None
    global_rotary = rotaries[-1]
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlp.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "max_position_embeddings": global_rotary.max_position_embeddings,
        "rms_norm_eps": norms[0].eps,
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "attention_bias": biases == {True},
        "attention_dropout": 0.0,
        "initializer_range": model.initializer_range,
    }
    return GemmaModel(
        fields=fields,
        sandwich=sandwich,
        layer_type_attention=typed,
        qk_norm=a.q_norm is not None,
        activation=mlp.activation,
        query_pre_attn_scalar=scalar,
        attn_logit_softcapping=a.attn_logit_softcapping,
        final_logit_softcapping=model.final_logit_softcapping,
        layer_types=layer_types,
        sliding_window=next(iter(windows), None),
        rotary=positions,
        layer_type_ok=not typed
        or all(x.layer_type == t for x, t in zip(attns, layer_types)),
    )


def default_rope(rotary) -> dict | None:
    """The `rope_parameters` of a default rotary embedding; None for a scaled one (whose
    parameters an export keeps from the config.json it was imported from)."""
    if type(rotary).__name__ != "RotaryEmbedding":
        return None
    return {"rope_theta": float(rotary.rope_theta), "rope_type": "default"}


def rope_theta_of(config: dict, default: float) -> float:
    """The global rope_theta a Gemma or Gemma 2 config.json gives its model."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta", default))


def agrees(source: dict | None, values: dict) -> bool:
    """Whether an imported config.json (SOURCE) gives the model the values its fields have in
    VALUES (name -> (the model's value, transformers' default)). The exporter keeps an imported
    config.json's fields outside base.STRUCTURE; a model whose knobs were changed from it (a -D)
    must then not be exported as this family with the old values."""
    if source is None:
        return True
    return all(
        source.get(name, default) == value for name, (value, default) in values.items()
    )


def export_fields(model, source):
    """A model of Gemma's parts: pre-norm layers of the library's attention (no QK-norm, no window,
    no soft-capping, the default scale) with a tanh-GELU MLP and one rotary embedding.
    """
    found = gemma_model(model, source)
    if found is None or found.sandwich or found.layer_type_attention or found.qk_norm:
        return None
    if found.activation != "gelu_tanh" or found.attn_logit_softcapping is not None:
        return None
    if found.final_logit_softcapping is not None or found.sliding_window is not None:
        return None
    if found.query_pre_attn_scalar != found.fields["head_dim"] or _is(
        found.rotary, "GemmaLocalGlobalRotary"
    ):
        return None
    fields = {**found.fields, "hidden_act": "gelu_pytorch_tanh"}
    rope = default_rope(found.rotary)
    if source is None:
        if rope is None:
            return None
        fields["rope_parameters"] = rope
    elif rope is not None and rope_theta_of(source, 10000.0) != rope["rope_theta"]:
        return None  # rope_theta changed from the config.json's (a -D): its rope_parameters would be kept
    return fields


def check(config: dict) -> str | None:
    """Gemma's rules: causal attention, an activation the template builds, a rope type the
    library has."""
    return check_common(config) or check_activation(config, "hidden_act")


SPEC = FamilySpec(
    name="gemma",
    model_type="gemma",
    architecture="GemmaForCausalLM",
    folder=Path(__file__).parent,
    knobs=GEMMA_KNOBS | {"hidden_act"},
    fixed=GEMMA_FIXED,
    # checked in check(): only its causal value (None or False) is accepted
    neutral=frozenset({"use_bidirectional_attention"}),
    check=check,
    export_fields=export_fields,
)
