"""The Llama family: transformers' LlamaForCausalLM, the component library's parts as they are."""

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope, llama_style


def export_fields(model, source):
    """A Llama-style model without QK-norm, and without a sliding window unless imported from a
    Llama config.json (transformers' Llama has no window: it ignores the field)."""
    found = llama_style(model, source)
    if found is None or found.qk_norm:
        return None
    if found.sliding_window is not None:
        return None
    if source is not None and source.get("model_type") not in (None, "llama"):
        return None
    return {
        **found.fields,
        "attention_bias": found.attention_bias,
        "mlp_bias": found.mlp_bias,
        "pretraining_tp": 1,
    }


SPEC = FamilySpec(
    name="llama",
    model_type="llama",
    architecture="LlamaForCausalLM",
    folder=Path(__file__).parent,
    knobs=LLAMA_KNOBS,
    fixed={**LLAMA_FIXED, "pretraining_tp": 1},
    check=check_rope,
    export_fields=export_fields,
)
