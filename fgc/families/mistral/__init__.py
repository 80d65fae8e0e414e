"""The Mistral family: transformers' MistralForCausalLM, a Llama whose attention has a sliding
window."""

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope, llama_style


def export_fields(model, source):
    """A Llama-style model with a sliding window (or imported from a Mistral config.json), without
    QK-norm or biases (transformers' Mistral has none)."""
    found = llama_style(model, source)
    if found is None or found.qk_norm or found.attention_bias or found.mlp_bias:
        return None
    if found.sliding_window is None and (source or {}).get("model_type") != "mistral":
        return None
    return {**found.fields, "sliding_window": found.sliding_window}


SPEC = FamilySpec(
    name="mistral",
    model_type="mistral",
    architecture="MistralForCausalLM",
    folder=Path(__file__).parent,
    knobs=LLAMA_KNOBS | {"sliding_window"},
    fixed=LLAMA_FIXED,
    check=check_rope,
    export_fields=export_fields,
)
