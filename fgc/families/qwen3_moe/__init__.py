"""The Qwen3-MoE family: transformers' Qwen3MoeForCausalLM, a Qwen3 (QK-norm) whose MLPs are
routed mixtures of SwiGLU experts (``fgc.components.moe``), except the layers
``mlp_only_layers`` and ``decoder_sparse_step`` make dense (a SwiGLU MLP of
``intermediate_size``): one layer factory per layer. The router's top-k probabilities are
renormalised only with ``norm_topk_prob``, and the routing weights are cast to the logits' dtype,
as transformers does. With ``use_sliding_window`` every layer attends within ``sliding_window``
(transformers 5's Qwen3MoeModel has no per-layer window). Trained with the load-balancing
auxiliary loss when ``output_router_logits``.

fgc holds each layer's experts as transformers 5 does in memory, two 3-D tensors
(``mlp.experts.gate_up_proj`` [E, 2I, D], ``mlp.experts.down_proj`` [E, D, I]), sharded by FSDP2
over the experts; checkpoints hold one tensor per expert and projection
(``mlp.experts.{e}.gate_proj``/``up_proj``/``down_proj``), which the tensor rules map both ways.

Expert parallelism is not implemented. The spec needs nothing more for it: the experts' tensors
keep these names and layouts (an "ep" mesh dimension would shard their dim 0), and an
expert-parallel trainer would be a plan of the parts (see fgc.components.moe), not a change here.
"""

from pathlib import Path

from ..base import LLAMA_FIXED, LLAMA_KNOBS, ExpertsRule, FamilySpec, check_rope
from ..moe_style import check_experts, moe_style

MOE_KNOBS = frozenset(
    {
        "use_sliding_window",
        "sliding_window",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "norm_topk_prob",
        "decoder_sparse_step",
        "mlp_only_layers",
        "router_aux_loss_coef",
        "output_router_logits",
    }
)


def routed_layers(
    num_hidden_layers: int, decoder_sparse_step: int, mlp_only_layers
) -> tuple[bool, ...]:
    """Which layers route (True) and which are dense, as transformers' Qwen3MoeDecoderLayer
    decides: layer i routes unless it is in MLP_ONLY_LAYERS or (i + 1) is not a multiple of
    DECODER_SPARSE_STEP."""
    only = set(mlp_only_layers or ())
    return tuple(
        i not in only and (i + 1) % decoder_sparse_step == 0
        for i in range(num_hidden_layers)
    )


def _experts_field(config: dict) -> str:
    # transformers 5 writes num_local_experts (num_experts maps to it); Qwen's checkpoints num_experts
    return "num_experts" if "num_experts" in config else "num_local_experts"


def check(config: dict) -> str | None:
    """The rope type and the integer fields (as every Llama-style family), the expert counts,
    ``decoder_sparse_step`` (at least 1) and ``mlp_only_layers`` (layer indices), and at least
    one routed layer (a model without one is a Qwen3)."""
    problem = check_rope(config) or check_experts(config, _experts_field(config))
    if problem is not None:
        return problem
    step = config.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or isinstance(step, bool) or step < 1:
        return f"decoder_sparse_step must be an integer of at least 1, got {step!r}"
    only = config.get("mlp_only_layers")
    if only is not None and not (
        isinstance(only, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in only)
    ):
        return f"mlp_only_layers must be a list of layer indices, got {only!r}"
    if not any(routed_layers(config["num_hidden_layers"], step, only)):
        return (
            "no layer routes (mlp_only_layers and decoder_sparse_step make every layer dense): "
            "fgc's qwen3_moe template needs at least one MoE layer; the model is a Qwen3"
        )
    return None


def export_fields(model, source):
    """An MoE model with QK-norm whose routing weights are in the logits' dtype (either
    renormalisation), dense layers allowed, without MLP biases; a window in every layer or
    none. The layer pattern is written as the imported config.json wrote it when it gives the
    same layers, else as ``mlp_only_layers`` with ``decoder_sparse_step`` 1."""
    found = moe_style(model, source)
    if found is None or not found.qk_norm or found.routing_weights_dtype != "input":
        return None
    fields = {
        **found.fields,
        "attention_bias": found.attention_bias,
        "moe_intermediate_size": found.moe_intermediate_size,
        "norm_topk_prob": found.norm_topk_prob,
        "use_sliding_window": found.sliding_window is not None,
        "sliding_window": found.sliding_window,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i, routed in enumerate(found.routed) if not routed],
    }
    if source is not None:
        step, only = source.get("decoder_sparse_step", 1), source.get("mlp_only_layers")
        if routed_layers(len(found.routed), step, only) == found.routed:
            fields.update(decoder_sparse_step=step, mlp_only_layers=only)
    # the name(s) the imported config.json gives the count, else Qwen's own (transformers maps it)
    for name in [
        n for n in ("num_experts", "num_local_experts") if n in (source or {})
    ] or ["num_experts"]:
        fields[name] = found.num_experts
    if found.dense_intermediate_size is not None:
        fields["intermediate_size"] = found.dense_intermediate_size
    elif source is None:
        fields["intermediate_size"] = (
            found.moe_intermediate_size
        )  # no dense layer reads it
    return fields


SPEC = FamilySpec(
    name="qwen3_moe",
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
    folder=Path(__file__).parent,
    # transformers' Qwen3-MoE has no mlp_bias: the template does not read it (a config.json's is a note)
    knobs=(LLAMA_KNOBS - {"mlp_bias"}) | MOE_KNOBS,
    fixed=LLAMA_FIXED,
    check=check,
    export_fields=export_fields,
    tensors=(
        ExpertsRule(
            (
                "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
                "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
            ),
            "model.layers.{i}.mlp.experts.gate_up_proj",
        ),
        ExpertsRule(
            ("model.layers.{i}.mlp.experts.{e}.down_proj.weight",),
            "model.layers.{i}.mlp.experts.down_proj",
        ),
    ),
)
