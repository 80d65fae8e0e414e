"""The OLMo 2 family: transformers' Olmo2ForCausalLM, a Llama whose layers normalise each
sublayer's output inside the residual and whose QK-norm spans the whole query and key projections
(the two parts of ``parts.py``)."""

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, check_rope

# the classes an OLMo 2 model is made of, by the module that defines them
_PARTS = {
    "CausalLM": "fgc.components.causal_lm",
    "DecoderStack": "fgc.components.causal_lm",
    "Olmo2DecoderLayer": f"{__name__}.parts",
    "Olmo2Attention": f"{__name__}.parts",
    "SwiGLUMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
}
_TORCH_PARTS = {"Embedding", "Linear", "ModuleList"}


def _is(module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == _PARTS[name]


def export_fields(model, source):
    """The config.json fields of an OLMo 2 model: one made of the library's CausalLM, SwiGLUMLP,
    RMSNorm and rotary embedding and this folder's layer and attention, every layer alike. A
    rotary embedding other than the default one counts only when the model was imported (its
    parameters are then the config.json's)."""
    for module in model.modules():
        cls = type(module)
        torch_part = (
            cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_PARTS
        )
        rotary = cls.__module__ == _PARTS["RotaryEmbedding"] and (
            source is not None or cls.__name__ == "RotaryEmbedding"
        )
        if not (
            cls.__name__ in _PARTS and _is(module, cls.__name__) or torch_part or rotary
        ):
            return None
    if (
        not _is(model, "CausalLM")
        or model.lm_head.bias is not None
        or not len(model.model.layers)
    ):
        return None
    if model.model.embedding_multiplier is not None or model.logits_scaling != 1.0:
        return None
    if model.final_logit_softcapping is not None:
        return None
    layers = list(model.model.layers)
    if not all(
        _is(layer, "Olmo2DecoderLayer") and _is(layer.self_attn, "Olmo2Attention")
        for layer in layers
    ):
        return None
    if not all(_is(layer.mlp, "SwiGLUMLP") for layer in layers):
        return None
    attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
    a, rotary = attns[0], model.model.positions
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]
    projections = [
        lin for x in attns for lin in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)
    ]
    if not (
        len({(x.num_attention_heads, x.num_key_value_heads, x.head_dim) for x in attns})
        == 1
        and all(
            x.sliding_window is None and x.use_rope and x.rotary_dim is None
            for x in attns
        )
        and all(
            x.scaling is None
            and x.attn_logit_softcapping is None
            and x.attention_dropout == 0.0
            for x in attns
        )
        and len({lin.bias is not None for lin in projections}) == 1
        and len({m.intermediate_size for m in mlps}) == 1
        and all(
            lin.bias is None
            for m in mlps
            for lin in (m.gate_proj, m.up_proj, m.down_proj)
        )
        and len({n.eps for n in norms}) == 1
        and all(n.offset == 0.0 for n in norms)
        and rotary.head_dim == a.head_dim
    ):
        return None
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlps[0].intermediate_size,
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
        "attention_bias": a.q_proj.bias is not None,
        "attention_dropout": 0.0,
        "initializer_range": model.initializer_range,
        # Olmo2Config's default (1) would make a token the padding one; fgc's model pads nothing
        "pad_token_id": None,
    }


SPEC = FamilySpec(
    name="olmo2",
    model_type="olmo2",
    architecture="Olmo2ForCausalLM",
    folder=Path(__file__).parent,
    # transformers' Olmo2 has no mlp_bias: the template does not read it (a config.json's is a note)
    knobs=LLAMA_KNOBS - {"mlp_bias"},
    fixed=LLAMA_FIXED,
    check=check_rope,
    export_fields=export_fields,
)
