"""The Mixtral family: transformers' MixtralForCausalLM, a Mistral whose MLP is a routed mixture
of SwiGLU experts (``fgc.components.moe``: each token's top-k experts of the router's softmax,
renormalised), trained with the load-balancing auxiliary loss when ``output_router_logits``.

fgc holds each layer's experts as transformers 5 does in memory, two 3-D tensors
(``mlp.experts.gate_up_proj`` [E, 2I, D], ``mlp.experts.down_proj`` [E, D, I]), sharded by FSDP2
over the experts; checkpoints hold one tensor per expert and projection under Mixtral's names
(``block_sparse_moe.experts.{e}.w1``/``w3``/``w2``, ``block_sparse_moe.gate``), which the tensor
rules map both ways. Refused: a router jitter (``router_jitter_noise`` other than 0).

Expert parallelism is not implemented. The spec needs nothing more for it: the experts' tensors
keep these names and layouts (an "ep" mesh dimension would shard their dim 0), and an
expert-parallel trainer would be a plan of the parts (see fgc.components.moe), not a change here.
"""

from pathlib import Path

from ..base import (
    LLAMA_FIXED,
    LLAMA_KNOBS,
    ExpertsRule,
    FamilySpec,
    TensorRule,
    check_rope,
)
from ..moe_style import check_experts, moe_style


def check(config: dict) -> str | None:
    """The rope type and the integer fields (as every Llama-style family), and the expert counts."""
    return check_rope(config) or check_experts(config, "num_local_experts")


def export_fields(model, source):
    """An MoE model whose every layer routes (renormalised top-k, fp32 routing weights), without
    QK-norm or biases; a sliding window allowed."""
    found = moe_style(model, source)
    if found is None or found.qk_norm or found.attention_bias or not all(found.routed):
        return None
    if not found.norm_topk_prob or found.routing_weights_dtype != "float32":
        return None
    return {
        **found.fields,
        "intermediate_size": found.moe_intermediate_size,
        "num_local_experts": found.num_experts,
        "sliding_window": found.sliding_window,
        "router_jitter_noise": 0.0,
    }


SPEC = FamilySpec(
    name="mixtral",
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    folder=Path(__file__).parent,
    # transformers' Mixtral has no attention_bias or mlp_bias: the template does not read them
    # (a config.json's are notes)
    knobs=(LLAMA_KNOBS - {"attention_bias", "mlp_bias"})
    | {
        "sliding_window",
        "num_local_experts",
        "num_experts_per_tok",
        "router_aux_loss_coef",
        "output_router_logits",
    },
    fixed={**LLAMA_FIXED, "router_jitter_noise": 0.0},
    check=check,
    export_fields=export_fields,
    tensors=(
        TensorRule(
            "model.layers.{i}.block_sparse_moe.gate.weight",
            ("model.layers.{i}.mlp.gate.weight",),
        ),
        # w1 is the gate projection, w3 the up projection, w2 the down projection of each expert
        ExpertsRule(
            (
                "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
            ),
            "model.layers.{i}.mlp.experts.gate_up_proj",
        ),
        ExpertsRule(
            ("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",),
            "model.layers.{i}.mlp.experts.down_proj",
        ),
    ),
)
