"""The Granite family: transformers' GraniteForCausalLM, a Llama with four multipliers: the
embeddings (``embedding_multiplier``), the attention's softmax scale (``attention_multiplier``),
each residual branch (``residual_multiplier``, in the family's own ``GraniteDecoderLayer``) and the
logits (divided by ``logits_scaling``)."""

from __future__ import annotations

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope
from ..qwen2 import layered_llama_style

MULTIPLIERS = (
    "embedding_multiplier",
    "logits_scaling",
    "residual_multiplier",
    "attention_multiplier",
)
LAYER = ("GraniteDecoderLayer", f"{__name__}.parts")


def check(config: dict) -> str | None:
    """Granite's rules: the rope type and integer sizes (as Llama's), numeric multipliers, and an
    attention dropout in [0, 1)."""
    problem = check_rope(config)
    if problem is not None:
        return problem
    for name in MULTIPLIERS:
        value = config.get(name, 1.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name} must be a number, got {value!r}"
    dropout = config.get("attention_dropout", 0.0)
    if (
        not isinstance(dropout, (int, float))
        or isinstance(dropout, bool)
        or not 0.0 <= dropout < 1.0
    ):
        return f"attention_dropout must be a number in [0, 1), got {dropout!r}"
    if config.get("logits_scaling", 1.0) == 0:
        return "logits_scaling must not be 0: the logits are divided by it"
    return None


def export_fields(model, source):
    """A Llama-style model whose layers are Granite's (scaled residual branches): every layer
    with full attention and rotary, biases on all four attention projections or none."""
    found = layered_llama_style(model, source, layer_class=LAYER)
    if found is None or found.qk_norm or found.qkv_bias != found.o_bias:
        return None
    if any(w is not None for w in found.windows) or not all(found.rope):
        return None
    # the attention's default scale, written out: transformers' Granite scales by the field
    scaling = (
        found.scaling if found.scaling is not None else found.fields["head_dim"] ** -0.5
    )
    return {
        **found.fields,
        "attention_bias": found.o_bias,
        "mlp_bias": found.mlp_bias,
        "embedding_multiplier": found.embedding_multiplier,
        "logits_scaling": found.logits_scaling,
        "residual_multiplier": found.residual_multiplier,
        "attention_multiplier": float(scaling),
    }


SPEC = FamilySpec(
    name="granite",
    model_type="granite",
    architecture="GraniteForCausalLM",
    folder=Path(__file__).parent,
    # Granite 3's config.json files train with attention dropout (0.1): a knob here, not fixed
    knobs=LLAMA_KNOBS | set(MULTIPLIERS) | {"attention_dropout"},
    fixed={k: v for k, v in LLAMA_FIXED.items() if k != "attention_dropout"},
    check=check,
    export_fields=export_fields,
)
