"""What the routed mixture-of-experts families (mixtral, qwen3_moe) share: recognising a model
built from the component library's MoE parts (``fgc.components.moe``) when exporting it, and the
config.json checks of their expert fields.

Not a family (it is not registered): each family folder's spec asks :func:`moe_style` and decides
whether the model is one of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

# the classes an MoE model of these families is made of, by the module that defines them
_PARTS = {
    "MoECausalLM": "fgc.components.moe",
    "SparseMoeBlock": "fgc.components.moe",
    "SwiGLUExperts": "fgc.components.moe",
    "DecoderStack": "fgc.components.causal_lm",
    "PreNormDecoderLayer": "fgc.components.layers",
    "CausalSelfAttention": "fgc.components.attention",
    "SwiGLUMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
}
_TORCH_PARTS = {"Embedding", "Linear", "ModuleList"}


def _is(module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == _PARTS.get(name)


@dataclass(frozen=True)
class MoEStyle:
    """A model of the library's MoE parts: the config.json fields every such family writes, and
    the features that tell the families apart."""

    fields: dict
    qk_norm: bool
    sliding_window: int | None
    attention_bias: bool
    routed: tuple[
        bool, ...
    ]  # per layer: a routed MoE block (True) or a dense SwiGLU MLP
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    dense_intermediate_size: int | None  # None: no dense layer
    norm_topk_prob: bool
    routing_weights_dtype: str


def moe_style(model, source: dict | None) -> MoEStyle | None:
    """MODEL (built on the meta device) as a model of the library's MoE parts, or None when it is
    not one: an ``MoECausalLM`` of pre-norm layers, each with the library's attention (alike in
    every layer) and either a ``SparseMoeBlock`` (alike in every layer, at least one) or a
    ``SwiGLUMLP`` without biases; RMSNorms of one eps; the default rotary embedding (another
    counts only when the model was imported: its parameters are then the config.json's).
    """
    for module in model.modules():
        cls = type(module)
        torch_part = (
            cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_PARTS
        )
        rotary = cls.__module__ == _PARTS["RotaryEmbedding"] and source is not None
        if not (_is(module, cls.__name__) or torch_part or rotary):
            return None
    if (
        not _is(model, "MoECausalLM")
        or not len(model.model.layers)
        or model.lm_head.bias is not None
    ):
        return None
    if model.model.embedding_multiplier is not None or model.logits_scaling != 1.0:
        return None
    if model.final_logit_softcapping is not None:
        return None
    layers = list(model.model.layers)
    if not all(
        _is(x, "PreNormDecoderLayer") and _is(x.self_attn, "CausalSelfAttention")
        for x in layers
    ):
        return None
    attns = [x.self_attn for x in layers]
    blocks = [x.mlp for x in layers if _is(x.mlp, "SparseMoeBlock")]
    dense = [x.mlp for x in layers if _is(x.mlp, "SwiGLUMLP")]
    if not blocks or len(blocks) + len(dense) != len(layers):
        return None
    a, b, rotary = attns[0], blocks[0], model.model.positions
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]
    attention_bias = a.o_proj.bias is not None
    if not (
        len(
            {
                (
                    x.num_attention_heads,
                    x.num_key_value_heads,
                    x.head_dim,
                    x.sliding_window,
                    x.q_norm is None,
                )
                for x in attns
            }
        )
        == 1
        and all(
            x.use_rope
            and x.rotary_dim is None
            and x.scaling is None
            and x.attn_logit_softcapping is None
            and x.attention_dropout == 0.0
            for x in attns
        )
        and all(
            {lin.bias is not None for lin in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)}
            == {attention_bias}
            for x in attns
        )
        and len(
            {
                (
                    m.num_experts,
                    m.num_experts_per_tok,
                    m.intermediate_size,
                    m.norm_topk_prob,
                    m.routing_weights_dtype,
                )
                for m in blocks
            }
        )
        == 1
        and len({m.intermediate_size for m in dense}) <= 1
        and all(
            lin.bias is None
            for m in dense
            for lin in (m.gate_proj, m.up_proj, m.down_proj)
        )
        and len({n.eps for n in norms}) == 1
        and all(n.offset == 0.0 for n in norms)
        and rotary.head_dim == a.head_dim
    ):
        return None
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
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
        "attention_dropout": 0.0,
        "initializer_range": model.initializer_range,
        "num_experts_per_tok": b.num_experts_per_tok,
        "router_aux_loss_coef": model.router_aux_loss_coef,
        "output_router_logits": bool(model.output_router_logits),
    }
    return MoEStyle(
        fields=fields,
        qk_norm=a.q_norm is not None,
        sliding_window=a.sliding_window,
        attention_bias=attention_bias,
        routed=tuple(_is(x.mlp, "SparseMoeBlock") for x in layers),
        num_experts=b.num_experts,
        num_experts_per_tok=b.num_experts_per_tok,
        moe_intermediate_size=b.intermediate_size,
        dense_intermediate_size=dense[0].intermediate_size if dense else None,
        norm_topk_prob=b.norm_topk_prob,
        routing_weights_dtype=b.routing_weights_dtype,
    )


def _count(config: dict, name: str, least: int) -> str | None:
    value = config.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        return f"{name} must be an integer of at least {least}, got {value!r}"
    return None


def check_experts(config: dict, experts_field: str) -> str | None:
    """The expert counts of a config.json: EXPERTS_FIELD (the number of experts) at least 1, and
    ``num_experts_per_tok`` between 1 and it."""
    problem = _count(config, experts_field, 1) or _count(
        config, "num_experts_per_tok", 1
    )
    if problem is not None:
        return problem
    if config["num_experts_per_tok"] > config[experts_field]:
        return (
            f"num_experts_per_tok ({config['num_experts_per_tok']}) is more than {experts_field} "
            f"({config[experts_field]})"
        )
    return None
