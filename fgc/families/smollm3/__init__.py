"""The SmolLM3 family: transformers' SmolLM3ForCausalLM, a Llama some of whose layers have no
rotary positions (``no_rope_layers``: 1 = the layer rotates, 0 = it does not; by default every
``no_rope_layer_interval``-th layer does not), with transformers 5's optional sliding-window
layers (``use_sliding_window``, ``sliding_window``, ``layer_types``)."""

from __future__ import annotations

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope
from ..qwen2 import check_layer_types, layered_llama_style, sliding_fields


def check(config: dict) -> str | None:
    """SmolLM3's rules: the rope type and integer sizes (as Llama's); ``no_rope_layers`` and
    ``layer_types``, when given, one entry per layer; a sliding layer only with
    ``use_sliding_window`` and a ``sliding_window`` (transformers' SmolLM3 gives such a layer
    the window under some attention implementations and not under others otherwise)."""
    problem = check_rope(config)
    if problem is not None:
        return problem
    n = config["num_hidden_layers"]
    interval = config.get("no_rope_layer_interval", 4)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        return f"no_rope_layer_interval must be a positive integer, got {interval!r}"
    rope = config.get("no_rope_layers")
    if rope is not None:
        if not isinstance(rope, list) or len(rope) != n:
            count = f"{len(rope)} entries" if isinstance(rope, list) else repr(rope)
            return f"no_rope_layers has {count}, but num_hidden_layers is {n}: it needs one entry per layer"
        if any(flag not in (0, 1) for flag in rope):
            return f"no_rope_layers must hold 1 (the layer uses rotary positions) or 0 per layer, got {rope!r}"
    window = config.get("sliding_window")
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        return f"sliding_window must be a positive integer, got {window!r}"
    return check_layer_types(
        config, "smollm3", window if config.get("use_sliding_window", False) else None
    )


def export_fields(model, source):
    """A Llama-style model with some layers without rotary, or imported from a SmolLM3
    config.json; biases on all four attention projections or none (``attention_bias``), no
    QK-norm, full attention or one sliding window per layer."""
    found = layered_llama_style(model, source)
    if found is None or found.qk_norm or found.qkv_bias != found.o_bias:
        return None
    if (
        found.scaling is not None
        or found.embedding_multiplier != 1.0
        or found.logits_scaling != 1.0
    ):
        return None
    if all(found.rope) and (source or {}).get("model_type") != "smollm3":
        return None  # a Llama (or Mistral) as its own family
    sliding = sliding_fields(found.windows)
    if sliding is None:
        return None
    fields = {
        **found.fields,
        **sliding,
        "attention_bias": found.o_bias,
        "mlp_bias": found.mlp_bias,
        "no_rope_layers": [int(r) for r in found.rope],
    }
    if source is None:
        # SmolLM3Config's default pad_token_id (128004) lies outside a smaller vocabulary, where
        # transformers cannot build the model: a model built from scratch has no padding id
        fields["pad_token_id"] = None
    return fields


SPEC = FamilySpec(
    name="smollm3",
    model_type="smollm3",
    architecture="SmolLM3ForCausalLM",
    folder=Path(__file__).parent,
    knobs=LLAMA_KNOBS
    | {
        "use_sliding_window",
        "sliding_window",
        "layer_types",
        "no_rope_layers",
        "no_rope_layer_interval",
    },
    fixed=LLAMA_FIXED,
    check=check,
    export_fields=export_fields,
)
