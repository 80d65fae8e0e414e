"""Hugging Face models at build time: read a model directory's config.json, decide what to export.

Import: ``hf_config(model_dir)`` (a global of the config language) reads ``MODEL_DIR/config.json``
and checks every field against what fgc's family templates can represent; a field they cannot is
an error naming it, at the config line that called ``hf_config``.

Export: :func:`export_spec` looks at the model built on the meta device. A model made only of the
component library's Llama-style parts is exported as the native transformers class (Llama, or
the family of the config.json it was imported from); any other model as a custom architecture,
with modelling code and ``auto_map`` for ``trust_remote_code=True``. The result is written into
the package as ``hf_config.json``, which ``fgc_runtime.hf`` reads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fgc_runtime.hf import _aliases

from .frontend.environment import TemplateRaise


@dataclass(frozen=True)
class Family:
    """A Hugging Face ``model_type`` that fgc can import: the library template that builds it,
    its transformers class, and the config.json fields whose values the template cannot change."""

    template: str
    architecture: str
    fixed: tuple[tuple[str, object], ...]  # field, the only value the template can represent


# fgc's components have no dropout, and only a SwiGLU MLP
_FIXED = (("hidden_act", "silu"), ("attention_dropout", 0.0), ("pretraining_tp", 1))
FAMILIES = {
    "llama": Family("lm/llama.yaml", "LlamaForCausalLM", _FIXED),
    "mistral": Family("lm/mistral.yaml", "MistralForCausalLM", _FIXED),
    "qwen3": Family("lm/qwen3.yaml", "Qwen3ForCausalLM", _FIXED + (("use_sliding_window", False),)),
}
# the rope types lm/train.yaml's [rotary] block builds
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# config.json fields the family templates read (hf_fields), or that say nothing about the weights
_KNOWN = {
    "architectures", "model_type", "dtype", "torch_dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "initializer_range",
    "max_position_embeddings", "output_attentions", "output_hidden_states", "return_dict",
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
    "tie_word_embeddings", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "attention_bias", "mlp_bias", "sliding_window", "max_window_layers",
    "layer_types",
}


def read_config_json(model_dir: str, nonrepro: dict[str, str] | None = None) -> dict:
    """``hf_config(model_dir)``: MODEL_DIR's config.json, checked against its family template.

    Returns the config.json fields (``rope_theta`` always there, from ``rope_parameters`` if need be),
    plus ``model_dir`` (absolute) and ``fgc_template`` (the family
    template to extend). A relative MODEL_DIR is relative to the working directory (noted as
    making the build machine-specific). Every problem raises TemplateRaise naming the field.
    """
    if model_dir is None or model_dir == "":
        raise TemplateRaise("model_dir is not set: pass -D model_dir=PATH, a local Hugging Face model directory")
    given = str(model_dir)
    path = Path(os.path.abspath(os.path.expanduser(given)))
    if not os.path.isabs(os.path.expanduser(given)) and nonrepro is not None:
        nonrepro[f"hf_config({given})"] = str(path)
    if not path.is_dir():
        raise TemplateRaise(f"model_dir {given}: no such directory")
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TemplateRaise(f"model_dir {given} has no config.json: not a Hugging Face model directory") from None
    except (OSError, ValueError) as exc:
        raise TemplateRaise(f"{config_path}: cannot read it as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise TemplateRaise(f"{config_path}: not a JSON object")
    check_config(config, str(config_path))
    out = dict(config)
    out["rope_theta"] = _rope_theta(config)
    out["model_dir"] = str(path)
    out["fgc_template"] = FAMILIES[config["model_type"]].template
    return out


def check_config(config: dict, where: str) -> None:
    """Raise TemplateRaise naming the first config.json field fgc's family template cannot represent."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise TemplateRaise(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    family = FAMILIES[model_type]
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(name), int) or isinstance(config.get(name), bool):
            raise TemplateRaise(f"{where}: {name} must be an integer, got {config.get(name)!r}")
    for name, wanted in family.fixed:
        if name in config and config[name] != wanted:
            raise TemplateRaise(
                f"{where}: {name} is {config[name]!r}, but fgc's {model_type} template supports only {wanted!r}"
            )
    for field in ("rope_parameters", "rope_scaling"):
        rope = config.get(field)
        if rope is None:
            continue
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
        if rope_type not in ROPE_TYPES:
            raise TemplateRaise(
                f"{where}: {field} has rope_type {rope_type!r}, which fgc's rotary embeddings do not "
                f"have (they have: {', '.join(ROPE_TYPES)})"
            )
        break
    if model_type == "llama" and config.get("sliding_window") is not None:
        raise TemplateRaise(f"{where}: sliding_window is set, but fgc's {model_type} template has no sliding window")
    other = sorted(t for t in config.get("layer_types") or () if t != "full_attention")
    if other:
        raise TemplateRaise(f"{where}: layer_types has {other[0]!r}; fgc's {model_type} template has only full_attention")
    unknown = sorted(k for k in config if k not in _KNOWN and k not in dict(family.fixed))
    if unknown:
        raise TemplateRaise(
            f"{where}: field {unknown[0]} ({config[unknown[0]]!r}) is not one fgc's {model_type} template knows"
        )


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


# ---- export -----------------------------------------------------------------------------------

# The component library's parts of the Llama, Mistral and Qwen3 families: a model made only of
# these (and torch's Embedding, Linear, ModuleList) is a standard one.
_PARTS = {
    "CausalLM": "fgc.components.causal_lm",
    "DecoderStack": "fgc.components.causal_lm",
    "PreNormDecoderLayer": "fgc.components.layers",
    "CausalSelfAttention": "fgc.components.attention",
    "SwiGLUMLP": "fgc.components.mlp",
    "RMSNorm": "fgc.components.norm",
    "RotaryEmbedding": "fgc.components.rotary",
}
_TORCH_PARTS = {"Embedding", "Linear", "ModuleList"}
# the fields every exported config states as the model has them; an imported config keeps its
# own values of the others (max_position_embeddings: the model is built for seq_len; rope
# scaling parameters: the model was built from them)
_STRUCTURE = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "sliding_window",
}


def export_spec(model, source: dict | None = None) -> dict:
    """What ``--export-hf`` writes for MODEL (built on the meta device): ``config``,
    ``generation_config``, ``tied`` (parameter name → the name it is tied to; written once) and
    ``remote_code``. SOURCE is the config.json the model was imported from, if any: the fields
    that do not describe the structure come from it."""
    tied = _aliases(model)  # the one definition the exporter uses too
    found = _family_config(model, source)
    if found is None or (tied and tied != {"lm_head.weight": "model.embed_tokens.weight"}):
        prefix = "fgc_model."
        config = {
            "architectures": ["FgcForCausalLM"],
            "model_type": "fgc",
            "auto_map": {
                "AutoConfig": "modeling_fgc.FgcConfig",
                "AutoModelForCausalLM": "modeling_fgc.FgcForCausalLM",
            },
            "tie_word_embeddings": bool(tied),
            "fgc_tied_weights": {prefix + k: prefix + v for k, v in sorted(tied.items())},
        }
        for name in ("vocab_size", "hidden_size", "num_hidden_layers"):
            if isinstance(getattr(model, name, None), int):
                config[name] = getattr(model, name)
        for name in ("bos_token_id", "eos_token_id"):
            if source and source.get(name) is not None:
                config[name] = source[name]
        remote = True
    else:
        model_type, fields = found
        drop = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures")
        config = {k: v for k, v in (source or {}).items() if k not in drop}
        for name, value in fields.items():
            if source is None or name in _STRUCTURE:
                config[name] = value
        config.update(model_type=model_type, architectures=[FAMILIES[model_type].architecture])
        config.setdefault("bos_token_id", None)
        config.setdefault("eos_token_id", None)
        remote = False
    generation = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(k) is not None}
    return {
        "config": dict(sorted(config.items())),
        "generation_config": generation,
        "tied": dict(sorted(tied.items())),
        "remote_code": remote,
    }


def _is(module, name: str) -> bool:
    cls = type(module)
    return cls.__name__ == name and cls.__module__ == _PARTS.get(name)


def _family_config(model, source: dict | None) -> tuple[str, dict] | None:
    """(model_type, config.json fields) of MODEL, or None when it is not one of the families.

    The family follows from the parts: QK-norm is Qwen3, a sliding window Mistral, neither Llama
    (or Mistral, when imported from a Mistral config.json). A rotary embedding other than the
    default one is a family member only when imported (its parameters are the config.json's).
    """
    for module in model.modules():
        cls = type(module)
        torch_part = cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_PARTS
        rotary = cls.__module__ == _PARTS["RotaryEmbedding"] and source is not None
        if not (_is(module, cls.__name__) or torch_part or rotary):
            return None
    if not _is(model, "CausalLM") or not len(model.model.layers) or model.lm_head.bias is not None:
        return None
    layers = list(model.model.layers)
    attns, mlps = [l.self_attn for l in layers], [l.mlp for l in layers]

    def same(values) -> bool:
        return len(set(values)) == 1

    def bias(*linears) -> set:
        return {lin.bias is not None for lin in linears}

    a, mlp, rotary = attns[0], mlps[0], model.model.rotary_emb
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]
    if not (
        same((x.num_attention_heads, x.num_key_value_heads, x.head_dim, x.sliding_window, x.q_norm is None) for x in attns)
        and same(m.intermediate_size for m in mlps)
        and same(n.eps for n in norms)
        and all(len(bias(x.q_proj, x.k_proj, x.v_proj, x.o_proj)) == 1 for x in attns)
        and all(len(bias(m.gate_proj, m.up_proj, m.down_proj)) == 1 for m in mlps)
        and rotary.head_dim == a.head_dim
    ):
        return None
    attention_bias = a.q_proj.bias is not None
    mlp_bias = mlp.gate_proj.bias is not None
    if a.q_norm is not None:
        model_type = "qwen3"
    elif a.sliding_window is not None or (source or {}).get("model_type") == "mistral":
        model_type = "mistral"
    else:
        model_type = "llama"
    if model_type != "llama" and mlp_bias or model_type == "mistral" and attention_bias:
        return None  # transformers' Mistral and Qwen3 have no such biases
    fields = {
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlp.intermediate_size,
        "num_hidden_layers": model.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": rotary.max_position_embeddings,
        "rms_norm_eps": norms[0].eps,
        "rope_parameters": {"rope_theta": float(rotary.rope_theta), "rope_type": "default"},
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": model.initializer_range,
    }
    if model_type == "llama":
        fields.update(attention_bias=attention_bias, mlp_bias=mlp_bias, pretraining_tp=1)
    elif model_type == "mistral":
        fields.update(sliding_window=a.sliding_window)
    else:
        fields.update(attention_bias=attention_bias, use_sliding_window=False, sliding_window=None)
    return model_type, fields
