"""The Gemma 2 family: transformers' Gemma2ForCausalLM. Gemma with sandwich norms, the softmax
scale query_pre_attn_scalar ** -0.5, soft-capped attention scores and logits, and alternating
sliding-window and full-attention layers. Its parts are the component library's and
`fgc.families.gemma.parts`' GemmaSandwichDecoderLayer; what it shares with Gemma and Gemma 3 at
the Hugging Face boundary is in `fgc.families.gemma`."""

from __future__ import annotations

from pathlib import Path

from ..base import FamilySpec
from ..gemma import (
    GEMMA_FIXED,
    GEMMA_KNOBS,
    TANH_GELUS,
    agrees,
    check_activation,
    check_common,
    check_layer_types,
    default_rope,
    gemma_model,
    rope_theta_of,
)

# the fields Gemma 2 and 3 add to Gemma's knobs
GEMMA2_KNOBS = GEMMA_KNOBS | {
    "hidden_activation",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "attn_logit_softcapping",
    "final_logit_softcapping",
}


def activation_name(activation: str) -> str:
    """transformers' hidden_activation for GatedMLP's ACTIVATION (Gemma 2 and 3: gelu is exact)."""
    return {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}[activation]


def source_activation(source: dict) -> str:
    """GatedMLP's activation for an imported Gemma 2 or 3 config.json's hidden_activation."""
    value = source.get("hidden_activation", "gelu_pytorch_tanh")
    return "gelu_tanh" if value in TANH_GELUS else value


def source_layer_types(source: dict, period: int) -> list:
    """The layer types transformers gives an imported config.json: its layer_types, else every
    PERIOD-th layer full attention (Gemma 2: 2; Gemma 3: sliding_window_pattern, 6)."""
    if source.get("layer_types") is not None:
        return list(source["layer_types"])
    return [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention"
        for i in range(source.get("num_hidden_layers", 0))
    ]


def export_fields(model, source):
    """A model of Gemma's parts with sandwich-norm layers of the library's attention (no QK-norm)
    and one rotary embedding."""
    found = gemma_model(model, source)
    if (
        found is None
        or not found.sandwich
        or found.layer_type_attention
        or found.qk_norm
    ):
        return None
    if (
        found.query_pre_attn_scalar is None
        or type(found.rotary).__module__ != "fgc.components.rotary"
    ):
        return None
    fields = {
        **found.fields,
        "hidden_activation": activation_name(found.activation),
        "query_pre_attn_scalar": found.query_pre_attn_scalar,
        "attn_logit_softcapping": found.attn_logit_softcapping,
        "final_logit_softcapping": found.final_logit_softcapping,
        # transformers' Gemma 2 builds a sliding-window mask even without sliding layers
        "sliding_window": found.sliding_window
        or (source or {}).get("sliding_window")
        or 4096,
        "layer_types": found.layer_types,
    }
    rope = default_rope(found.rotary)
    if source is None:
        if rope is None:
            return None
        return {**fields, "rope_parameters": rope}
    same = agrees(
        source,
        {
            "query_pre_attn_scalar": (found.query_pre_attn_scalar, 256),
            "attn_logit_softcapping": (found.attn_logit_softcapping, 50.0),
            "final_logit_softcapping": (found.final_logit_softcapping, 30.0),
        },
    )
    if (
        not same
        or source_layer_types(source, 2) != found.layer_types
        or source_activation(source) != found.activation
    ):
        return None
    if rope is not None and rope_theta_of(source, 10000.0) != rope["rope_theta"]:
        return None
    return fields


def check(config: dict) -> str | None:
    """Gemma 2's rules: causal attention, an activation the template builds, layer types of
    the two kinds, a window for the sliding layers, a rope type the library has."""
    return (
        check_common(config)
        or check_activation(config, "hidden_activation")
        or check_layer_types(config, default_period=2)
    )


SPEC = FamilySpec(
    name="gemma2",
    model_type="gemma2",
    architecture="Gemma2ForCausalLM",
    folder=Path(__file__).parent,
    knobs=GEMMA2_KNOBS,
    fixed=GEMMA_FIXED,
    # checked in check(): only its causal value (None or False) is accepted
    neutral=frozenset({"use_bidirectional_attention"}),
    check=check,
    export_fields=export_fields,
)
