"""The GPT-2 family: transformers' GPT2LMHeadModel.

Learned absolute positions, pre-norm blocks with LayerNorm, biased attention and MLP, a GELU MLP,
a tied head, and dropout on the embeddings, the attention weights and the residual branches
(parts.py). The checkpoint's names are GPT-2's: q, k and v fused into one `c_attn` tensor, and
every projection stored transposed (transformers' Conv1D), under `transformer.` (or without it,
as checkpoints saved from GPT2Model are). Refused: `reorder_and_upcast_attn` and
`add_cross_attention` (fixed), an activation the MLP does not have (check).
"""

from __future__ import annotations

from pathlib import Path

from ..base import FamilySpec, TensorRule

# transformers' activation names (activation_function) -> fgc's MLP activation; the template
# has the same table. The tanh approximations differ only in how they write sqrt(2 / pi),
# below fp32's precision.
ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# an export names each MLP activation so
EXPORTED_ACTIVATION = {
    "gelu_tanh": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
}

# GPT2Config's fields the template reads (the shared names are its attribute_map's aliases)
KNOBS = frozenset(
    {
        "vocab_size",
        "n_embd",
        "n_layer",
        "n_head",
        "n_inner",
        "n_positions",
        "activation_function",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "layer_norm_epsilon",
        "initializer_range",
        "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx",
        "tie_word_embeddings",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
    }
)
# GPT2Config's field name -> the alias its attribute_map gives it
ALIASES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
}
# transformers' defaults of the fields whose value changes the model's function
DEFAULTS = {
    "n_inner": None,
    "n_positions": 1024,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
}


def field(config: dict, name: str, default=None):
    """CONFIG's value of GPT-2's field NAME, or of its attribute_map alias, or DEFAULT."""
    if name in config:
        return config[name]
    return config.get(ALIASES.get(name, ""), default)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(config: dict) -> str | None:
    """What fgc's GPT-2 template cannot represent: missing or non-integer sizes, a field and its
    alias that disagree, an activation the MLP lacks, a width the heads do not divide.
    """
    for name, alias in ALIASES.items():
        if name in config and alias in config and config[name] != config[alias]:
            return f"{alias} ({config[alias]!r}) differs from {name} ({config[name]!r})"
    for name in ("vocab_size", "n_embd", "n_layer", "n_head"):
        value = field(config, name)
        if not _int(value) or value < 1:
            return f"{name} must be a positive integer, got {value!r}"
    positions = field(config, "n_positions", DEFAULTS["n_positions"])
    if not _int(positions) or positions < 1:
        return f"n_positions must be a positive integer, got {positions!r}"
    inner = config.get("n_inner")
    if inner is not None and (not _int(inner) or inner < 1):
        return f"n_inner must be null or a positive integer, got {inner!r}"
    if field(config, "n_embd") % field(config, "n_head"):
        return f"n_head ({field(config, 'n_head')}) must divide n_embd ({field(config, 'n_embd')})"
    activation = config.get("activation_function", DEFAULTS["activation_function"])
    if activation not in ACTIVATIONS:
        return (
            f"activation_function is {activation!r}, which fgc's MLP does not have "
            f"(it has: {', '.join(ACTIVATIONS)})"
        )
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        value = config.get(name, 0.0)
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not 0 <= value < 1
        ):
            return f"{name} must be a probability below 1, got {value!r}"
    return None


def _tensor_rules() -> tuple[TensorRule, ...]:
    """GPT-2's checkpoint names: under `transformer.` (GPT2LMHeadModel's own), then without it
    (checkpoints saved from GPT2Model, as the original GPT-2 weights were), loading taking
    whichever the files hold; the causal-mask buffers older checkpoints saved are not weights.
    """
    layer, h = "model.layers.{i}.", "h.{i}."
    rules = []
    for prefix in ("transformer.", ""):
        rules += [
            TensorRule(prefix + "wte.weight", ("model.embed_tokens.weight",)),
            TensorRule(prefix + "wpe.weight", ("model.positions.weight",)),
            TensorRule(prefix + "ln_f.weight", ("model.norm.weight",)),
            TensorRule(prefix + "ln_f.bias", ("model.norm.bias",)),
        ]
        for ours, theirs in (
            ("input_layernorm", "ln_1"),
            ("post_attention_layernorm", "ln_2"),
        ):
            for kind in ("weight", "bias"):
                rules.append(
                    TensorRule(
                        f"{prefix}{h}{theirs}.{kind}", (f"{layer}{ours}.{kind}",)
                    )
                )
        for kind in ("weight", "bias"):
            qkv = tuple(f"{layer}self_attn.{p}_proj.{kind}" for p in "qkv")
            rules.append(
                TensorRule(
                    f"{prefix}{h}attn.c_attn.{kind}",
                    qkv,
                    dim=0,
                    transpose=kind == "weight",
                )
            )
            for ours, theirs in (
                ("self_attn.o_proj", "attn.c_proj"),
                ("mlp.up_proj", "mlp.c_fc"),
                ("mlp.down_proj", "mlp.c_proj"),
            ):
                rules.append(
                    TensorRule(
                        f"{prefix}{h}{theirs}.{kind}",
                        (f"{layer}{ours}.{kind}",),
                        transpose=kind == "weight",
                    )
                )
        rules += [
            TensorRule(f"{prefix}{h}attn.{buffer}", ())
            for buffer in ("bias", "masked_bias")
        ]
    return tuple(rules)


def _is(module, name: str, module_name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == module_name


# the parts a GPT-2 is made of: (class name, module)
_PARTS = {
    ("GPT2CausalLM", "fgc.families.gpt2.parts"),
    ("GPT2DecoderLayer", "fgc.families.gpt2.parts"),
    ("DecoderStack", "fgc.components.causal_lm"),
    ("CausalSelfAttention", "fgc.components.attention"),
    ("MLP", "fgc.components.mlp"),
    ("LearnedPositionalEmbedding", "fgc.components.positions"),
    ("LayerNorm", "torch.nn.modules.normalization"),
    ("Embedding", "torch.nn.modules.sparse"),
    ("Linear", "torch.nn.modules.linear"),
    ("ModuleList", "torch.nn.modules.container"),
}


def export_fields(model, source):
    """A model of GPT-2's parts: multi-head attention with biases and GPT-2's scale, a plain MLP
    with biases, LayerNorms with biases, learned positions, every layer alike. With SOURCE (an
    imported config.json), its fields that change the function must give this model (the
    exporter keeps its fields outside base.STRUCTURE): otherwise, None."""
    if not all(
        (type(m).__name__, type(m).__module__) in _PARTS for m in model.modules()
    ):
        return None
    if not _is(model, "GPT2CausalLM", "fgc.families.gpt2.parts") or not len(
        model.model.layers
    ):
        return None
    if model.lm_head.bias is not None or model.model.embedding_multiplier is not None:
        return None
    if model.logits_scaling != 1.0 or model.final_logit_softcapping is not None:
        return None
    layers = list(model.model.layers)
    attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]
    a, mlp, positions = attns[0], mlps[0], model.model.positions
    norms = [m for m in model.modules() if type(m).__name__ == "LayerNorm"]
    head_dim = model.hidden_size // a.num_attention_heads
    # the softmax scale: head_dim ** -0.5 (scale_attn_weights) or 1, layer i's divided by i + 1
    # with scale_attn_by_inverse_layer_idx (the arithmetic of GPT2CausalLM and transformers)
    inverse = model.scale_attn_by_inverse_layer_idx

    def scale(x) -> float:
        return x.scaling if x.scaling is not None else head_dim**-0.5

    first = scale(attns[0])
    if first not in (head_dim**-0.5, 1.0) or any(
        scale(x) != first / float(i + 1 if inverse else 1) for i, x in enumerate(attns)
    ):
        return None
    if not (
        all(
            x.num_attention_heads == a.num_attention_heads
            and x.num_key_value_heads == x.num_attention_heads
            and x.head_dim == head_dim
            and x.head_dim * x.num_attention_heads == model.hidden_size
            and x.sliding_window is None
            and x.q_norm is None
            and x.rotary_dim is None
            and x.attn_logit_softcapping is None
            and x.attention_dropout == a.attention_dropout
            and all(
                p.bias is not None for p in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)
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
            layer.residual_dropout == layers[0].residual_dropout for layer in layers
        )
        and all(
            n.eps == norms[0].eps and n.weight is not None and n.bias is not None
            for n in norms
        )
        and tuple(norms[0].normalized_shape) == (model.hidden_size,)
        and positions.hidden_size == model.hidden_size
        and mlp.activation in EXPORTED_ACTIVATION
    ):
        return None
    fields = {
        "vocab_size": model.vocab_size,
        "n_embd": model.hidden_size,
        "n_layer": model.num_hidden_layers,
        "n_head": a.num_attention_heads,
        "n_inner": mlp.intermediate_size,
        "n_positions": positions.max_position_embeddings,
        "activation_function": EXPORTED_ACTIVATION[mlp.activation],
        "layer_norm_epsilon": norms[0].eps,
        "scale_attn_weights": first != 1.0,
        "scale_attn_by_inverse_layer_idx": bool(inverse),
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "initializer_range": model.initializer_range,
        "resid_pdrop": layers[0].residual_dropout,
        "embd_pdrop": model.embedding_dropout,
        "attn_pdrop": a.attention_dropout,
    }
    if source is not None:
        if source.get("model_type") != "gpt2":
            return None
        inner = field(source, "n_inner", DEFAULTS["n_inner"])
        theirs = {
            "n_embd": field(source, "n_embd"),
            "n_layer": field(source, "n_layer"),
            "n_head": field(source, "n_head"),
            "n_inner": inner if inner is not None else 4 * field(source, "n_embd", 0),
            "n_positions": field(source, "n_positions", DEFAULTS["n_positions"]),
            "activation_function": ACTIVATIONS.get(
                source.get("activation_function", DEFAULTS["activation_function"])
            ),
            "layer_norm_epsilon": source.get(
                "layer_norm_epsilon", DEFAULTS["layer_norm_epsilon"]
            ),
            "scale_attn_weights": source.get(
                "scale_attn_weights", DEFAULTS["scale_attn_weights"]
            ),
            "scale_attn_by_inverse_layer_idx": source.get(
                "scale_attn_by_inverse_layer_idx",
                DEFAULTS["scale_attn_by_inverse_layer_idx"],
            ),
        }
        ours = {**fields, "activation_function": mlp.activation}
        if any(ours[name] != value for name, value in theirs.items()):
            return None
    return fields


SPEC = FamilySpec(
    name="gpt2",
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    folder=Path(__file__).parent,
    knobs=KNOBS,
    fixed={"reorder_and_upcast_attn": False, "add_cross_attention": False},
    # read only by GPT2DoubleHeadsModel's and the classification models' heads
    neutral=frozenset(
        {
            "summary_type",
            "summary_use_proj",
            "summary_activation",
            "summary_proj_to_labels",
            "summary_first_dropout",
        }
    ),
    check=check,
    export_fields=export_fields,
    tensors=_tensor_rules(),
)
