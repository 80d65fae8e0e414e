"""The Phi-3 family: transformers' Phi3ForCausalLM, a Llama with partial rotary, a sliding window
and LongRoPE (``parts.py``), whose checkpoints fuse q, k and v into ``qkv_proj`` and gate and up
into ``gate_up_proj`` (the tensor rules below; fgc keeps the separate projections, so tensor
parallelism splits them as usual)."""

from numbers import Real
from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, FamilySpec, TensorRule, check_rope

# the rope types transformers' Phi3Config accepts, all of which the template builds
ROPE_TYPES = ("default", "longrope")

# the classes a Phi-3 model is made of, by the module that defines them
_PARTS = {
    "CausalLM": "fgc.components.causal_lm",
    "DecoderStack": "fgc.components.causal_lm",
    "PreNormDecoderLayer": "fgc.components.layers",
    "CausalSelfAttention": "fgc.components.attention",
    "SwiGLUMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
    "Phi3LongRoPEEmbedding": f"{__name__}.parts",
}
_TORCH_PARTS = {"Embedding", "Linear", "ModuleList"}


def _rope(config: dict) -> tuple[str, object]:
    """The rope field transformers' Phi3Config reads (rope_scaling over rope_parameters) and its value."""
    name = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    return name, config.get(name) or {}


def check(config: dict) -> str | None:
    """Phi-3's rope types (default and longrope only, as transformers' Phi3Config), a partial
    rotary factor that leaves an even number of rotary channels, and LongRoPE factor lists of one
    entry per rotary channel pair."""
    problem = check_rope(
        {
            k: v
            for k, v in config.items()
            if k not in ("rope_parameters", "rope_scaling")
        }
    )
    if problem is not None:
        return problem
    name, rope = _rope(config)
    if not isinstance(rope, dict):
        return f"{name} must be a mapping, got {rope!r}"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return (
            f"{name} has rope_type {rope_type!r}, which fgc's phi3 template does not have "
            f"(it has: {', '.join(ROPE_TYPES)})"
        )
    factor = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if config["num_attention_heads"] < 1:
        return f"num_attention_heads must be at least 1, got {config['num_attention_heads']}"
    head_dim = (
        config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    )
    if not isinstance(factor, Real) or isinstance(factor, bool):
        return f"partial_rotary_factor must be a number, got {factor!r}"
    rotary_dim = int(head_dim * factor)
    if not (2 <= rotary_dim <= head_dim and rotary_dim % 2 == 0):
        return (
            f"partial_rotary_factor {factor!r} rotates {rotary_dim} of the {head_dim} channels of a head: "
            "fgc's rotary embeddings need an even number of them, at least 2"
        )
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            values = rope.get(key)
            if not (
                isinstance(values, list)
                and len(values) == rotary_dim // 2
                and all(isinstance(v, Real) and not isinstance(v, bool) for v in values)
            ):
                return (
                    f"{name}: longrope's {key} must be a list of {rotary_dim // 2} numbers, one per rotary "
                    f"channel pair, got {values!r}"
                )
    return None


def _is(module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == _PARTS.get(name)


def export_fields(model, source):
    """The config.json fields of a Phi-3 model: the library's Llama parts (without biases or
    QK-norm), partial rotary and a sliding window allowed, with the default rotary embedding or
    LongRoPE, every layer alike."""
    for module in model.modules():
        cls = type(module)
        torch_part = (
            cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_PARTS
        )
        if not (_is(module, cls.__name__) or torch_part):
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
        _is(x, "PreNormDecoderLayer") and _is(x.self_attn, "CausalSelfAttention")
        for x in layers
    ):
        return None
    if not all(_is(x.mlp, "SwiGLUMLP") for x in layers):
        return None
    attns, mlps, rotary = (
        [x.self_attn for x in layers],
        [x.mlp for x in layers],
        model.model.positions,
    )
    a = attns[0]
    rotary_dim = a.rotary_dim or a.head_dim
    linears = [lin for x in attns for lin in (x.q_proj, x.k_proj, x.v_proj, x.o_proj)]
    linears += [lin for m in mlps for lin in (m.gate_proj, m.up_proj, m.down_proj)]
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]
    if not (
        len(
            {
                (
                    x.num_attention_heads,
                    x.num_key_value_heads,
                    x.head_dim,
                    x.sliding_window,
                    x.rotary_dim,
                )
                for x in attns
            }
        )
        == 1
        and all(
            x.use_rope
            and x.q_norm is None
            and x.scaling is None
            and x.attn_logit_softcapping is None
            and x.attention_dropout == 0.0
            for x in attns
        )
        and all(lin.bias is None for lin in linears)
        and len({m.intermediate_size for m in mlps}) == 1
        and len({n.eps for n in norms}) == 1
        and all(n.offset == 0.0 for n in norms)
        and rotary.head_dim == rotary_dim
    ):
        return None
    partial = rotary_dim / a.head_dim
    if (
        int(a.head_dim * partial) != rotary_dim
    ):  # a ratio transformers would round to another width
        return None
    rope = {
        "rope_theta": float(rotary.rope_theta),
        "rope_type": "default",
        "partial_rotary_factor": partial,
    }
    fields = {}
    if _is(rotary, "Phi3LongRoPEEmbedding"):
        rope.update(
            rope_type="longrope",
            short_factor=list(rotary.short_factor),
            long_factor=list(rotary.long_factor),
            original_max_position_embeddings=rotary.original_max_position_embeddings,
            attention_factor=rotary.attention_factor,
        )
        if rotary.factor is not None:
            rope["factor"] = rotary.factor
        fields["original_max_position_embeddings"] = (
            rotary.original_max_position_embeddings
        )
    if a.head_dim != model.hidden_size // a.num_attention_heads:
        fields["head_dim"] = a.head_dim  # transformers' Phi3 reads it when given
    return {
        **fields,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlps[0].intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": rotary.max_position_embeddings,
        "rms_norm_eps": norms[0].eps,
        "rope_parameters": rope,
        "sliding_window": a.sliding_window,
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "attention_dropout": 0.0,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "initializer_range": model.initializer_range,
        # Phi3Config's default (32000) would be outside a small vocabulary; fgc's model pads nothing
        "pad_token_id": None,
    }


SPEC = FamilySpec(
    name="phi3",
    model_type="phi3",
    architecture="Phi3ForCausalLM",
    folder=Path(__file__).parent,
    # transformers' Phi3 has no attention_bias or mlp_bias: the template does not read them (a
    # config.json's are notes)
    knobs=(LLAMA_KNOBS - {"attention_bias", "mlp_bias"})
    | {"sliding_window", "original_max_position_embeddings", "partial_rotary_factor"},
    fixed={**LLAMA_FIXED, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    check=check,
    export_fields=export_fields,
    tensors=(
        # q, k and v rows one after the other, then gate and up: transformers' Phi3Attention and Phi3MLP
        TensorRule(
            "model.layers.{i}.self_attn.qkv_proj.weight",
            (
                "model.layers.{i}.self_attn.q_proj.weight",
                "model.layers.{i}.self_attn.k_proj.weight",
                "model.layers.{i}.self_attn.v_proj.weight",
            ),
        ),
        TensorRule(
            "model.layers.{i}.mlp.gate_up_proj.weight",
            (
                "model.layers.{i}.mlp.gate_proj.weight",
                "model.layers.{i}.mlp.up_proj.weight",
            ),
        ),
    ),
)
