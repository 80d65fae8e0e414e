"""The Gemma 3 family, text only: transformers' Gemma3ForCausalLM (model_type gemma3_text).
Gemma 2's layers with QK-norm, no attention soft-capping, and two sets of rotary tables: the
sliding-window layers rotate with `rope_local_base_freq`, the full-attention ones with
`rope_theta` and its scaling. Its parts are the component library's and
`fgc.families.gemma.parts`' (GemmaSandwichDecoderLayer, GemmaLayerTypeAttention,
GemmaLocalGlobalRotary)."""

from __future__ import annotations

from pathlib import Path

from ..base import ROPE_TYPES, FamilySpec
from ..gemma import (
    GEMMA_FIXED,
    agrees,
    check_activation,
    check_common,
    check_layer_types,
    default_rope,
    gemma_model,
)
from ..gemma2 import (
    GEMMA2_KNOBS,
    activation_name,
    source_activation,
    source_layer_types,
)

DEFAULT_GLOBAL_THETA = 1_000_000.0  # transformers' Gemma3TextConfig.default_theta
DEFAULT_LOCAL_THETA = 10_000.0


def _rope_sets(config: dict) -> tuple[dict | None, dict | None]:
    """(local, global) rope parameters of a config.json: transformers 5's per-layer-type
    rope_parameters, or (None, rope_scaling) of an earlier version's."""
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        return rope.get("sliding_attention"), rope.get("full_attention")
    return None, config.get("rope_scaling")


def source_thetas(source: dict) -> tuple[float, float]:
    """(local, global) rope_theta transformers gives an imported config.json."""
    local, global_ = _rope_sets(source)
    local_theta = (local or {}).get(
        "rope_theta", source.get("rope_local_base_freq", DEFAULT_LOCAL_THETA)
    )
    global_theta = (global_ or {}).get(
        "rope_theta", source.get("rope_theta", DEFAULT_GLOBAL_THETA)
    )
    return float(local_theta), float(global_theta)


def check(config: dict) -> str | None:
    """Gemma 3's rules: Gemma 2's, no attention soft-capping, rope parameters per layer type (or
    an earlier version's fields) of types the library has, the global rope_theta stated.
    """
    problem = (
        check_common(config)
        or check_activation(config, "hidden_activation")
        or check_layer_types(config, default_period=6)
    )
    if problem:
        return problem
    if config.get("attn_logit_softcapping") is not None:
        return (
            f"attn_logit_softcapping is {config['attn_logit_softcapping']!r}: transformers' Gemma3ForCausalLM "
            "does not apply it, and fgc's gemma3 template has no attention soft-capping (set it to null)"
        )
    rope = config.get("rope_parameters")
    if rope is not None and not (
        isinstance(rope, dict)
        and set(rope) <= {"sliding_attention", "full_attention"}
        and all(isinstance(v, dict) or v is None for v in rope.values())
    ):
        return f"rope_parameters must map sliding_attention and full_attention to their rope parameters, got {rope!r}"
    for name, params in zip(
        ("sliding_attention", "full_attention"), _rope_sets(config)
    ):
        if params is None:
            continue
        if not isinstance(params, dict):
            return f"the rope parameters of the {name} layers must be a mapping, got {params!r}"
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            return (
                f"the {name} layers' rope_type is {rope_type!r}, which fgc's rotary embeddings do not have "
                f"(they have: {', '.join(ROPE_TYPES)})"
            )
    # fgc's hf_config() fills a missing rope_theta with Llama's 10000.0, not Gemma 3's 1e6
    _, global_ = _rope_sets(config)
    if "rope_theta" not in (global_ or {}) and "rope_theta" not in config:
        return "the full-attention layers' rope_theta is not stated (rope_parameters.full_attention.rope_theta or rope_theta): give it"
    return None


def export_fields(model, source):
    """A model of Gemma's parts with sandwich-norm layers, QK-norm, attention that picks its
    rotary tables by layer type (agreeing with its window) and two rotary embeddings."""
    found = gemma_model(model, source)
    if found is None or not (
        found.sandwich
        and found.layer_type_attention
        and found.qk_norm
        and found.layer_type_ok
    ):
        return None
    if found.query_pre_attn_scalar is None or found.attn_logit_softcapping is not None:
        return None
    if type(found.rotary).__name__ != "GemmaLocalGlobalRotary":
        return None
    fields = {
        **found.fields,
        "hidden_activation": activation_name(found.activation),
        "query_pre_attn_scalar": found.query_pre_attn_scalar,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": found.final_logit_softcapping,
        "sliding_window": found.sliding_window
        or (source or {}).get("sliding_window")
        or 4096,
        "layer_types": found.layer_types,
        "use_bidirectional_attention": False,
    }
    local, global_ = default_rope(found.rotary.local_rotary), default_rope(
        found.rotary.global_rotary
    )
    if source is None:
        if local is None or global_ is None:
            return None
        return {
            **fields,
            "rope_parameters": {"sliding_attention": local, "full_attention": global_},
        }
    same = agrees(
        source,
        {
            "query_pre_attn_scalar": (found.query_pre_attn_scalar, 256),
            "final_logit_softcapping": (found.final_logit_softcapping, None),
        },
    )
    period = source.get("sliding_window_pattern", 6)
    if (
        not same
        or source_layer_types(source, period) != found.layer_types
        or source_activation(source) != found.activation
    ):
        return None
    local_theta, global_theta = source_thetas(source)
    if (
        float(found.rotary.local_rotary.rope_theta) != local_theta
        or float(found.rotary.global_rotary.rope_theta) != global_theta
    ):
        return None
    return fields


SPEC = FamilySpec(
    name="gemma3",
    model_type="gemma3_text",
    architecture="Gemma3ForCausalLM",
    folder=Path(__file__).parent,
    knobs=GEMMA2_KNOBS | {"rope_local_base_freq", "sliding_window_pattern"},
    fixed=GEMMA_FIXED,
    # use_bidirectional_attention: checked in check(); _sliding_window_pattern: what transformers
    # derived sliding_window_pattern into, never read back (layer_types holds the pattern)
    neutral=frozenset({"use_bidirectional_attention", "_sliding_window_pattern"}),
    check=check,
    export_fields=export_fields,
)
