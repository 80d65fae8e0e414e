"""What fgc knows of a model family, in one :class:`FamilySpec` per family folder.

A family is one folder of ``fgc/families/``: ``__init__.py`` defines ``SPEC``, ``template.yaml`` is
its template (extended as ``lm/NAME.yaml``), and modules of its own parts may sit beside them
(vendored into model.py like the component library's). ``fgc/families/__init__.py`` registers the
folder by name; the loader, ``hf_config()``, the exporter and the docs iterate the registry.

The model's own structure (its decoder layers, how a pipeline cuts it, the tensor-parallel plan, the
kernels, FLOPs per token) is declared by its parts and by the component library's ``CausalLM`` (see
docs/components.md), since the runtime in a package needs it without fgc. A spec holds what lies at
the Hugging Face boundary: which ``model_type`` and class the family is, how each config.json field
relates to the template, how tensor names map in both directions, and how to recognise a model of
the family when exporting it.

docs/adding-a-family.md walks through adding one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# config.json fields that no model's function depends on (token ids, caches, what the outputs
# hold): every family accepts any value of them
NEUTRAL_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "model_type",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
    }
)


@dataclass(frozen=True)
class TensorRule:
    """How one kind of tensor is named in a Hugging Face checkpoint and in fgc's model.

    ``hf`` and each name of ``fgc`` may hold ``{i}`` (a layer index). One fgc name: a rename.
    Several: the Hugging Face tensor is their concatenation along ``dim`` (of fgc's layout), as
    GPT-2's ``c_attn`` holds q, k and v, and Phi-3's ``gate_up_proj`` gate and up. ``transpose``:
    the checkpoint stores the transpose of fgc's 2-D weight (GPT-2's ``Conv1D``). ``groups``: the
    config.json field whose value G says the concatenation is interleaved: G groups one after
    another along ``dim``, each the concatenation of every fgc tensor's next 1/G part (GPT-NeoX's
    ``query_key_value``, ``groups="num_attention_heads"``: q, k and v head by head). No fgc name:
    the checkpoint's tensor is not a weight (a buffer older checkpoints saved, as GPT-2's
    ``attn.bias``), and loading ignores it. Several rules may name the same fgc tensor (a
    checkpoint saved with or without a prefix): loading takes the first the files hold,
    exporting the first.
    """

    hf: str
    fgc: tuple[str, ...]
    dim: int = 0
    transpose: bool = False
    groups: str | None = None

    def to_data(self, config: dict | None = None) -> dict:
        """The rule as JSON data, as the package's ``hf_config.json`` carries it; ``groups``
        becomes its value in CONFIG (the config.json the checkpoint has), 1 without ``groups``.
        """
        data = {
            "hf": self.hf,
            "fgc": list(self.fgc),
            "dim": self.dim,
            "transpose": self.transpose,
        }
        if self.groups is not None:
            value = (config or {}).get(self.groups)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"tensor rule {self.hf}: config field {self.groups} is {value!r}, not a positive integer"
                )
            data["groups"] = value
        return data


@dataclass(frozen=True)
class ExpertsRule:
    """Experts' weights that fgc holds as one 3-D tensor, the experts stacked along dim 0 (as
    transformers 5 holds them in memory: ``mlp.experts.gate_up_proj``), and a checkpoint holds
    as one or several 2-D tensors per expert (as transformers writes them: Mixtral's
    ``block_sparse_moe.experts.{e}.w1.weight``).

    ``hf`` names hold ``{e}`` (the expert index) and may hold ``{i}`` (a layer index), as ``fgc``
    may. Expert e's slice of the fgc tensor is the concatenation along its first dim of the
    checkpoint's tensors ``hf`` of expert e, in order, equal shares (Mixtral's ``gate_up_proj``:
    ``w1``, the gate, then ``w3``, the up projection). A checkpoint that holds the fgc tensor
    under its own name loads as it is.
    """

    hf: tuple[str, ...]
    fgc: str

    def to_data(self, config: dict | None = None) -> dict:
        """The rule as JSON data, as the package's ``hf_config.json`` carries it."""
        return {"experts": list(self.hf), "fgc": [self.fgc]}


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its name, its Hugging Face identity, and its boundary rules.

    - ``name``: the family's name in fgc (``-D family=NAME``; its template is ``lm/NAME.yaml``).
    - ``model_type``, ``architecture``: the Hugging Face ``model_type`` it imports, and the
      transformers class an export of it names.
    - ``folder``: the family's folder (``template.yaml`` in it).
    - ``knobs``: the config.json fields its template reads (through ``hf_fields``).
    - ``fixed``: fields whose only value the template can represent (e.g. ``hidden_act: silu``).
    - ``neutral``: fields of transformers' config class for this model_type that do not change
      the model's function (besides :data:`NEUTRAL_FIELDS`).
    - ``check``: a family's own rule on a config.json (the problem, or None).
    - ``export_fields``: the config.json fields of a model built from the family's parts, or None
      when the model is not of this family (``export_fields(model, source)``; SOURCE is the
      config.json the model was imported from, or None).
    - ``tensors``: tensor name rules, where the checkpoint's names are not fgc's (none: the same).
    """

    name: str
    model_type: str
    architecture: str
    folder: Path
    knobs: frozenset[str]
    export_fields: Callable
    fixed: dict = field(default_factory=dict)
    neutral: frozenset[str] = frozenset()
    check: Callable[[dict], str | None] | None = None
    tensors: tuple[TensorRule | ExpertsRule, ...] = ()

    @property
    def template(self) -> Path:
        """The family's template file."""
        return self.folder / "template.yaml"

    @property
    def library_name(self) -> str:
        """The name configs extend it by: ``lm/NAME.yaml``."""
        return f"lm/{self.name}.yaml"

    def classify(self, config: dict) -> tuple[str | None, list[str]]:
        """Sort a config.json's fields: the first problem (a field the template cannot represent,
        named, with its value), or None; and the fields ignored because transformers' model of
        this model_type does not read them (they cannot change its function)."""
        if self.check is not None:
            problem = self.check(config)
            if problem is not None:
                return problem, []
        read_by_transformers = _config_class_fields(self.model_type)
        ignored = []
        for name in sorted(config):
            value = config[name]
            if name in self.fixed:
                if value != self.fixed[name]:
                    return (
                        f"{name} is {value!r}, but fgc's {self.name} template supports only {self.fixed[name]!r}",
                        [],
                    )
            elif name in self.knobs or name in self.neutral or name in NEUTRAL_FIELDS:
                continue
            elif name in read_by_transformers:
                return (
                    f"field {name} ({value!r}) is not one fgc's {self.name} template knows",
                    [],
                )
            else:
                ignored.append(name)
        return None, ignored


@functools.lru_cache(maxsize=None)
def _config_class_fields(model_type: str) -> frozenset[str]:
    """The fields transformers' config class for MODEL_TYPE defines (its model may read them)."""
    from transformers import AutoConfig

    return frozenset(AutoConfig.for_model(model_type).to_dict())


# ---- shared by the families built from the component library's Llama-style parts ---------------

# the rope types the library's [positions] block builds (transformers' rope_type names)
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# config.json fields a Llama-style template reads (lm/llama.yaml's hf_fields)
LLAMA_KNOBS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "max_position_embeddings",
        "initializer_range",
    }
)
# fields whose only value the library's parts represent: no dropout, a SwiGLU MLP
LLAMA_FIXED = {"hidden_act": "silu", "attention_dropout": 0.0}
# the fields every export states as the model has them; an imported config keeps its own values
# of the others (max_position_embeddings: the model is built for seq_len; rope scaling parameters:
# the model was built from them)
STRUCTURE = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "sliding_window",
        # routed mixture-of-experts families (fgc.components.moe)
        "num_local_experts",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "use_sliding_window",
        "router_aux_loss_coef",
        "output_router_logits",
        "router_jitter_noise",
        # per-layer kinds and Granite's multipliers (qwen2, smollm3, granite)
        "layer_types",
        "max_window_layers",
        "no_rope_layers",
        "embedding_multiplier",
        "logits_scaling",
        "residual_multiplier",
        "attention_multiplier",
    }
)


def check_rope(config: dict) -> str | None:
    """A rope type the library's rotary embeddings do not have, or an integer field that is not one."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
    ):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name} must be an integer, got {value!r}"
    for name in ("rope_parameters", "rope_scaling"):
        rope = config.get(name)
        if rope is None:
            continue
        rope_type = (
            rope.get("rope_type", rope.get("type", "default"))
            if isinstance(rope, dict)
            else rope
        )
        if rope_type not in ROPE_TYPES:
            return (
                f"{name} has rope_type {rope_type!r}, which fgc's rotary embeddings do not have "
                f"(they have: {', '.join(ROPE_TYPES)})"
            )
        break
    return None


# The component library's Llama-style parts: a model made only of these (and torch's Embedding,
# Linear, ModuleList) is one of the Llama-style families.
_LIBRARY_PARTS = {
    "CausalLM": "fgc.components.causal_lm",
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
    return cls.__name__ == name and cls.__module__ == _LIBRARY_PARTS.get(name)


@dataclass(frozen=True)
class LlamaStyle:
    """What a model of the library's Llama-style parts has: the config.json fields every such
    family writes, and the features that tell the families apart."""

    fields: dict
    qk_norm: bool
    sliding_window: int | None
    attention_bias: bool
    mlp_bias: bool


def llama_style(model, source: dict | None) -> LlamaStyle | None:
    """MODEL (built on the meta device) as a Llama-style model, or None when it is not one: made
    of the library's parts only, every layer alike. A rotary embedding other than the default one
    counts only when the model was imported (its parameters are then the config.json's).
    """
    for module in model.modules():
        cls = type(module)
        torch_part = (
            cls.__module__.startswith("torch.nn") and cls.__name__ in _TORCH_PARTS
        )
        rotary = (
            cls.__module__ == _LIBRARY_PARTS["RotaryEmbedding"] and source is not None
        )
        if not (_is(module, cls.__name__) or torch_part or rotary):
            return None
    if (
        not _is(model, "CausalLM")
        or not len(model.model.layers)
        or model.lm_head.bias is not None
    ):
        return None
    layers = list(model.model.layers)
    attns, mlps = [layer.self_attn for layer in layers], [layer.mlp for layer in layers]

    def same(values) -> bool:
        return len(set(values)) == 1

    def bias(*linears) -> set:
        return {lin.bias is not None for lin in linears}

    a, mlp, rotary = attns[0], mlps[0], model.model.positions
    norms = [m for m in model.modules() if _is(m, "RMSNorm")]
    if not (
        same(
            (
                x.num_attention_heads,
                x.num_key_value_heads,
                x.head_dim,
                x.sliding_window,
                x.q_norm is None,
            )
            for x in attns
        )
        and all(x.use_rope for x in attns)
        # the options none of Llama, Mistral and Qwen3 has: a model with one is not of these
        # families (another family may claim it, else it exports as a custom architecture)
        and all(
            x.scaling is None
            and x.attn_logit_softcapping is None
            and x.rotary_dim is None
            and x.attention_dropout == 0.0
            for x in attns
        )
        and all(n.offset == 0.0 for n in norms)
        and model.model.embedding_multiplier in (None, 1.0)
        and model.logits_scaling == 1.0
        and model.final_logit_softcapping is None
        and same(m.intermediate_size for m in mlps)
        and same(n.eps for n in norms)
        and all(len(bias(x.q_proj, x.k_proj, x.v_proj, x.o_proj)) == 1 for x in attns)
        and all(len(bias(m.gate_proj, m.up_proj, m.down_proj)) == 1 for m in mlps)
        and rotary.head_dim == a.head_dim
    ):
        return None
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
        "rope_parameters": {
            "rope_theta": float(rotary.rope_theta),
            "rope_type": "default",
        },
        "tie_word_embeddings": bool(model.tie_word_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": model.initializer_range,
    }
    return LlamaStyle(
        fields=fields,
        qk_norm=a.q_norm is not None,
        sliding_window=a.sliding_window,
        attention_bias=a.q_proj.bias is not None,
        mlp_bias=mlp.gate_proj.bias is not None,
    )
