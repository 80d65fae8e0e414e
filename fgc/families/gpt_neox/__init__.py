"""The GPT-NeoX family: transformers' GPTNeoXForCausalLM (GPT-NeoX, Pythia).

LayerNorms with biases, a parallel residual (or the sequential one), partial rotary positions,
biased attention and MLP, GELU, an untied head, dropout on the embeddings, the attention weights
and each branch (parts.py). The checkpoint's names are GPT-NeoX's (`gpt_neox.embed_in`,
`gpt_neox.layers.N.attention.query_key_value`, `embed_out`, ...); `query_key_value` holds q, k
and v head by head (`[heads, 3, head_dim]` along its first dimension), a rule with `groups`.
Refused (check): an activation the MLP does not have, a rope type the rotary embeddings lack, a
rotary fraction that leaves an odd or empty number of rotating channels.
"""

from __future__ import annotations

from pathlib import Path

from ..base import ROPE_TYPES, FamilySpec, TensorRule

# transformers' activation names (hidden_act) -> fgc's MLP activation (the template has the same
# table); the tanh approximations differ only in how they write sqrt(2 / pi), below fp32's precision
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# an export of a model not imported from a config.json names each MLP activation so
EXPORTED_ACTIVATION = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "relu": "relu",
    "silu": "silu",
}

KNOBS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "attention_dropout",
        "hidden_dropout",
        "max_position_embeddings",
        "initializer_range",
        "layer_norm_eps",
        "tie_word_embeddings",
        "use_parallel_residual",
        "attention_bias",
        # rotary: transformers 5's rope_parameters, and the fields it converts from
        "rope_parameters",
        "rope_scaling",
        "rotary_pct",
        "rotary_emb_base",
    }
)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rope_of(config: dict) -> tuple[dict, float, float, str]:
    """(the scaling mapping, rope_theta, partial_rotary_factor, rope_type) a GPT-NeoX config.json
    gives its model, as transformers 5 reads them: rope_scaling first, then rope_parameters, then
    rotary_emb_base and rotary_pct."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        rope = {}
    theta = rope.get("rope_theta", config.get("rotary_emb_base", 10000.0))
    pct = rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25))
    return rope, theta, pct, rope.get("rope_type", rope.get("type", "default"))


def check(config: dict) -> str | None:
    """What fgc's GPT-NeoX template cannot represent: missing or non-integer sizes, heads that do
    not divide the width, an activation the MLP lacks, a rope type the rotary embeddings lack, a
    partial rotary of an odd or empty number of channels."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        value = config.get(name)
        if not _int(value) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    if config["hidden_size"] % config["num_attention_heads"]:
        return f"num_attention_heads ({config['num_attention_heads']}) must divide hidden_size ({config['hidden_size']})"
    activation = config.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        return f"hidden_act is {activation!r}, which fgc's MLP does not have (it has: {', '.join(ACTIVATIONS)})"
    for name in ("rope_scaling", "rope_parameters"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            return f"{name} must be a mapping, got {config[name]!r}"
    rope, theta, pct, rope_type = rope_of(config)
    where = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    if rope_type not in ROPE_TYPES:
        return (
            f"{where} has rope_type {rope_type!r}, which fgc's rotary embeddings do not have "
            f"(they have: {', '.join(ROPE_TYPES)})"
        )
    name = "partial_rotary_factor" if "partial_rotary_factor" in rope else "rotary_pct"
    if not isinstance(pct, (int, float)) or isinstance(pct, bool) or not 0 < pct <= 1:
        return f"{name} must be in (0, 1], got {pct!r}"
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    rotary_dim = int(head_dim * pct)
    if rotary_dim < 2 or rotary_dim % 2:
        return f"{name} {pct!r} rotates {rotary_dim} of each head's {head_dim} channels; fgc's rotary needs an even number, at least 2"
    for name in ("attention_dropout", "hidden_dropout"):
        value = config.get(name, 0.0)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not 0 <= value < 1
        ):
            return f"{name} must be a probability below 1, got {value!r}"
    return None


def _tensor_rules() -> tuple[TensorRule, ...]:
    """GPT-NeoX's checkpoint names. The head is `embed_out` (transformers 5 reads and writes that
    name; `lm_head` is loaded too); the causal-mask buffers older checkpoints saved are not
    weights."""
    layer, theirs = "model.layers.{i}.", "gpt_neox.layers.{i}."
    rules = [
        TensorRule("gpt_neox.embed_in.weight", ("model.embed_tokens.weight",)),
        TensorRule("gpt_neox.final_layer_norm.weight", ("model.norm.weight",)),
        TensorRule("gpt_neox.final_layer_norm.bias", ("model.norm.bias",)),
        TensorRule("embed_out.weight", ("lm_head.weight",)),
        TensorRule("lm_head.weight", ("lm_head.weight",)),
    ]
    for kind in ("weight", "bias"):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rules.append(
                TensorRule(f"{theirs}{norm}.{kind}", (f"{layer}{norm}.{kind}",))
            )
        qkv = tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv")
        rules.append(
            TensorRule(
                f"{theirs}attention.query_key_value.{kind}",
                qkv,
                groups="num_attention_heads",
            )
        )
        for ours, name in (
            ("self_attn.o_proj", "attention.dense"),
            ("mlp.up_proj", "mlp.dense_h_to_4h"),
            ("mlp.down_proj", "mlp.dense_4h_to_h"),
        ):
            rules.append(
                TensorRule(f"{theirs}{name}.{kind}", (f"{layer}{ours}.{kind}",))
            )
    rules += [
        TensorRule(f"{theirs}attention.{buffer}", ())
        for buffer in ("bias", "masked_bias")
    ]
    return tuple(rules)


# the parts a GPT-NeoX is made of: (class name, module)
_PARTS = {
    ("GPTNeoXCausalLM", "fgc.families.gpt_neox.parts"),
    ("GPTNeoXDecoderLayer", "fgc.families.gpt_neox.parts"),
    ("DecoderStack", "fgc.components.causal_lm"),
    ("CausalSelfAttention", "fgc.components.attention"),
    ("MLP", "fgc.components.mlp"),
    ("RotaryEmbedding", "fgc.components.rotary"),
    ("LayerNorm", "torch.nn.modules.normalization"),
    ("Embedding", "torch.nn.modules.sparse"),
    ("Linear", "torch.nn.modules.linear"),
    ("ModuleList", "torch.nn.modules.container"),
}


def _rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """A partial_rotary_factor that transformers turns back into ROTARY_DIM channels
    (`int(head_dim * factor)`)."""
    factor = rotary_dim / head_dim
    return (
        factor
        if int(head_dim * factor) == rotary_dim
        else (rotary_dim + 0.5) / head_dim
    )


def export_fields(model, source):
    """A model of GPT-NeoX's parts: multi-head attention with the default scale and partial (or
    full) rotary, its four projections all with biases or all without, a plain MLP with biases,
    LayerNorms with biases, one dropout for the embeddings and the branches, every layer alike.
    Its rotary embedding is the default one, or one of the scaled ones when imported from a
    config.json (its parameters are then the config's). With SOURCE, the fields outside
    base.STRUCTURE that change the function must give this model: otherwise, None."""
    rotary = model.model.positions if hasattr(model, "model") else None
    for m in model.modules():
        scaled_rotary = (
            m is rotary
            and type(m).__module__ == "fgc.components.rotary"
            and source is not None
        )
        if (type(m).__name__, type(m).__module__) not in _PARTS and not scaled_rotary:
            return None
    if type(model).__name__ != "GPTNeoXCausalLM" or not len(model.model.layers):
        return None
    if model.lm_head.bias is not None or model.model.embedding_multiplier is not None:
        return None
    if model.logits_scaling != 1.0 or model.final_logit_softcapping is not None:
        return None
    layers = list(model.model.layers)
    attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
    a, mlp = attns[0], mlps[0]
    norms = [m for m in model.modules() if type(m).__name__ == "LayerNorm"]
    head_dim = model.hidden_size // a.num_attention_heads
    rotary_dim = a.rotary_dim or a.head_dim
    bias = a.q_proj.bias is not None
    if not (
        all(
            x.num_attention_heads == a.num_attention_heads
            and x.num_key_value_heads == x.num_attention_heads
            and x.head_dim == head_dim
            and x.head_dim * x.num_attention_heads == model.hidden_size
            and (x.rotary_dim or x.head_dim) == rotary_dim
            and x.use_rope
            and x.sliding_window is None
            and x.q_norm is None
            and x.attn_logit_softcapping is None
            and x.scaling in (None, head_dim**-0.5)
            and x.attention_dropout == a.attention_dropout
            and all(
                (p.bias is not None) == bias
                for p in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)
            )
            for x in attns
        )
        and all(
            m.intermediate_size == mlp.intermediate_size
            and m.activation == mlp.activation
            and m.up_proj.bias is not None
            and m.down_proj.bias is not None
            for m in mlps
        )
        and all(
            layer.use_parallel_residual == layers[0].use_parallel_residual
            and layer.hidden_dropout == model.embedding_dropout
            for layer in layers
        )
        and all(
            n.eps == norms[0].eps and n.weight is not None and n.bias is not None
            for n in norms
        )
        and tuple(norms[0].normalized_shape) == (model.hidden_size,)
        and rotary.head_dim == rotary_dim
        and mlp.activation in EXPORTED_ACTIVATION
    ):
        return None
    hidden_act = EXPORTED_ACTIVATION[mlp.activation]
    if (
        source is not None
        and ACTIVATIONS.get(source.get("hidden_act", "gelu")) == mlp.activation
    ):
        hidden_act = source.get(
            "hidden_act", "gelu"
        )  # the config.json's own name of it
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "intermediate_size": mlp.intermediate_size,
        "hidden_act": hidden_act,
        "layer_norm_eps": norms[0].eps,
        "use_parallel_residual": bool(layers[0].use_parallel_residual),
        "attention_bias": bias,
        "attention_dropout": a.attention_dropout,
        "hidden_dropout": model.embedding_dropout,
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "initializer_range": model.initializer_range,
        "max_position_embeddings": rotary.max_position_embeddings,
    }
    default_rope = type(rotary).__name__ == "RotaryEmbedding"
    if default_rope:
        fields["rope_parameters"] = {
            "rope_theta": float(rotary.rope_theta),
            "partial_rotary_factor": _rotary_factor(rotary_dim, head_dim),
            "rope_type": "default",
        }
    if source is not None:
        if source.get("model_type") != "gpt_neox":
            return None
        _, theta, pct, rope_type = rope_of(source)
        if (
            source.get("layer_norm_eps", 1e-5) != fields["layer_norm_eps"]
            or source.get("use_parallel_residual", True)
            != fields["use_parallel_residual"]
            or float(theta) != float(rotary.rope_theta)
            or int(head_dim * pct) != rotary_dim
            or (rope_type == "default") != default_rope
        ):
            return None
    return fields


SPEC = FamilySpec(
    name="gpt_neox",
    model_type="gpt_neox",
    architecture="GPTNeoXForCausalLM",
    folder=Path(__file__).parent,
    knobs=KNOBS,
    # classifier_dropout: read only by the classification models' heads; is_decoder: not read
    # by GPTNeoXForCausalLM
    neutral=frozenset({"classifier_dropout", "is_decoder"}),
    check=check,
    export_fields=export_fields,
    tensors=_tensor_rules(),
)
