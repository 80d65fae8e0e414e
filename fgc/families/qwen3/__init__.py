"""The Qwen3 family: transformers' Qwen3ForCausalLM, a Llama with QK-norm (an RMSNorm over each
head's channels on the queries and keys, before the rotation)."""

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope, llama_style


def check(config: dict) -> str | None:
    """Qwen3's sliding-window layers are not supported: only full attention."""
    if config.get("use_sliding_window"):
        return "use_sliding_window is True, but fgc's qwen3 template has no sliding-window layers"
    other = sorted(t for t in config.get("layer_types") or () if t != "full_attention")
    if other:
        return f"layer_types has {other[0]!r}; fgc's qwen3 template has only full_attention"
    return check_rope(config)


def export_fields(model, source):
    """A Llama-style model with QK-norm, no sliding window and no MLP bias."""
    found = llama_style(model, source)
    if (
        found is None
        or not found.qk_norm
        or found.sliding_window is not None
        or found.mlp_bias
    ):
        return None
    return {
        **found.fields,
        "attention_bias": found.attention_bias,
        "use_sliding_window": False,
        "sliding_window": None,
    }


SPEC = FamilySpec(
    name="qwen3",
    model_type="qwen3",
    architecture="Qwen3ForCausalLM",
    folder=Path(__file__).parent,
    knobs=LLAMA_KNOBS,
    fixed=LLAMA_FIXED,
    # only meaningful with use_sliding_window, which check() refuses
    neutral=frozenset(
        {"sliding_window", "max_window_layers", "layer_types", "use_sliding_window"}
    ),
    check=check,
    export_fields=export_fields,
)
