"""Routed mixture-of-experts feed-forward (Mixtral, Qwen3-MoE) and the causal LM that trains it
with the load-balancing auxiliary loss.

`SparseMoeBlock` replaces a layer's MLP: a router (`gate`, a Linear D -> E without bias) picks the
top-k experts of each token from the softmax of its logits, and the token's output is the sum of
those experts' outputs, each times its routing weight. The experts (`SwiGLUExperts`) are held as
transformers 5 holds them in memory: two 3-D parameters, `experts.gate_up_proj` [E, 2I, D] and
`experts.down_proj` [E, D, I], so a whole layer's experts are one tensor each, sharded by FSDP2
over dim 0 (the experts) like every parameter. `MoECausalLM` is the component library's
`CausalLM` with what the MoE needs: `aux_loss()` (the load-balancing term the trainers add to
the loss), `flops_per_token` counting the parameters a token uses (the router and its top-k
experts, not all experts), and `init_weights` for the experts' weights.

Expert parallelism is not implemented; the layout leaves room for it. An expert-parallel plan
would shard dim 0 of `gate_up_proj` and `down_proj` over an "ep" mesh dimension (each rank holding
E / ep whole experts) and, in `SwiGLUExperts.forward`, exchange the expert-sorted token rows with
an all-to-all (the per-expert counts it already computes are the split sizes) before the
per-expert loop, and back after it. The router, the routing weights and the load-balancing
statistics stay on every rank, so `aux_loss()` does not change.

Shape legend: B batch, T sequence, D hidden size, I an expert's intermediate size, E experts,
K experts per token (top-k), N tokens (B*T).
"""

import re
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from fgc.components.causal_lm import CausalLM
from fgc_runtime.kernels import swiglu


def routing_statistics(
    router_logits_NE: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What the load-balancing loss needs of one layer's router logits, as transformers'
    `load_balancing_loss_func` computes it: the softmax over the experts (in the logits' dtype),
    its top-k experts per token, then `(tokens_per_expert_E, prob_sum_E, rows)`: how many of the
    N tokens chose each expert among their top-k (no gradient), the sum over the tokens of each
    expert's probability (fp32, differentiable), and N."""
    probs_NE = F.softmax(router_logits_NE, dim=-1)
    with torch.no_grad():
        top_NK = torch.topk(probs_NE, top_k, dim=-1).indices
        counts_E = torch.bincount(
            top_NK.reshape(-1), minlength=router_logits_NE.shape[-1]
        ).float()
    return counts_E, probs_NE.float().sum(dim=0), router_logits_NE.shape[0]


def load_balancing_loss(statistics, num_experts: int) -> torch.Tensor:
    """The load-balancing auxiliary loss of Switch Transformer (eqs. 4-6), as transformers'
    `load_balancing_loss_func` computes it over the layers of one forward: with f_e the fraction
    of (token, top-k slot) assignments that went to expert e and P_e the mean probability of e,
    both pooled over every layer's tokens, `E * sum_e f_e * P_e` (f sums to K, so a perfectly
    balanced router gives K). STATISTICS: one `routing_statistics(...)` per MoE layer.
    """
    counts_E = sum(s[0] for s in statistics)
    prob_sum_E = sum(s[1] for s in statistics)
    rows = sum(s[2] for s in statistics)
    return torch.sum((counts_E / rows) * (prob_sum_E / rows)) * num_experts


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts as two 3-D parameters, as transformers 5's MixtralExperts and
    Qwen3MoeExperts hold them: `gate_up_proj` [E, 2I, D] (expert e's gate rows, then its up rows)
    and `down_proj` [E, D, I]. Expert e computes `down_e(silu(gate_e(x)) * up_e(x))`.

    `forward(x_ND, top_k_index_NK, top_k_weights_NK)`: each token's output is the sum over its K
    chosen experts of the expert's output times its routing weight (in the weights' dtype, then
    cast to x's), as transformers computes it. The (token, slot) pairs are sorted by expert once,
    so each expert runs one matmul over its tokens; an expert no token chose is skipped. The
    activation is `fgc_runtime.kernels.swiglu` in the implementation `kernel_impl` asks for.
    """

    kernels = ("swiglu",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.kernel_impl = kernel_impl
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size)
        )
        # MoECausalLM.init_weights draws them by name like every weight; this is for a block used alone
        nn.init.normal_(self.gate_up_proj, std=0.02)
        nn.init.normal_(self.down_proj, std=0.02)

    def forward(
        self,
        x_ND: torch.Tensor,
        top_k_index_NK: torch.Tensor,
        top_k_weights_NK: torch.Tensor,
    ) -> torch.Tensor:
        K = top_k_index_NK.shape[1]
        expert_M = top_k_index_NK.reshape(
            -1
        )  # M = N*K (token, slot) pairs, token-major
        # the pairs grouped by expert (stable: in token order within an expert)
        order_M = expert_M.argsort(stable=True)
        counts = torch.bincount(expert_M, minlength=self.num_experts).tolist()
        token_M = order_M // K
        outputs = []
        for e, x_CD in enumerate(x_ND[token_M].split(counts)):
            if counts[e] == 0:
                continue
            gate_CI, up_CI = F.linear(x_CD, self.gate_up_proj[e]).chunk(2, dim=-1)
            outputs.append(
                F.linear(
                    swiglu(gate_CI, up_CI, impl=self.kernel_impl), self.down_proj[e]
                )
            )
        out_ND = torch.zeros_like(x_ND)
        if not outputs:
            return out_ND
        y_MD = torch.cat(outputs) * top_k_weights_NK.reshape(-1)[order_M, None]
        return out_ND.index_add_(0, token_M, y_MD.to(out_ND.dtype))


class SparseMoeBlock(nn.Module):
    """A routed mixture-of-experts feed-forward, in place of a layer's MLP (transformers 5's
    MixtralSparseMoeBlock and Qwen3MoeSparseMoeBlock): `mlp(x_BTD)` -> `(B, T, D)`.

    The router `gate` (Linear D -> E, no bias) gives each token's logits; their softmax (fp32)
    picks the `num_experts_per_tok` experts with the highest probabilities, whose probabilities
    are the routing weights: renormalised to sum to 1 with `norm_topk_prob` (Mixtral always;
    Qwen3-MoE as its config says), and kept in fp32 (`routing_weights_dtype="float32"`, Mixtral)
    or cast to the logits' dtype (`"input"`, Qwen3-MoE). The experts are `SwiGLUExperts` with
    `intermediate_size` each. State-dict names: `gate.weight`, `experts.gate_up_proj`,
    `experts.down_proj`.

    With `record_routing`, the statistics for the load-balancing loss (`routing_statistics` of
    the router logits) are computed in every forward and appended to `routing_sink` when it is a
    list: `MoECausalLM` sets the flag as `output_router_logits` says, and the sink during its
    forward only, so recomputing a layer under activation checkpointing computes the same tensors
    (as checkpointing requires) but records nothing. Tensor parallelism
    does not split the block (no `tp_plan`): its router and experts stay whole on every rank.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        num_experts_per_tok: int,
        intermediate_size: int,
        norm_topk_prob: bool = True,
        routing_weights_dtype: Literal["float32", "input"] = "float32",
        kernel_impl: Literal["auto", "torch", "triton"] = "auto",
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(
                f"SparseMoeBlock: num_experts must be at least 1, got {num_experts}"
            )
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(
                f"SparseMoeBlock: num_experts_per_tok must be between 1 and num_experts ({num_experts}), "
                f"got {num_experts_per_tok}"
            )
        if routing_weights_dtype not in ("float32", "input"):
            raise ValueError(
                f"SparseMoeBlock: routing_weights_dtype must be 'float32' or 'input', got {routing_weights_dtype!r}"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.intermediate_size = intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.routing_weights_dtype = routing_weights_dtype
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = SwiGLUExperts(
            hidden_size, intermediate_size, num_experts, kernel_impl
        )
        self.record_routing = False
        self.routing_sink = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        logits_NE = self.gate(x_ND)
        probs_NE = F.softmax(logits_NE.float(), dim=-1)
        weights_NK, experts_NK = torch.topk(probs_NE, self.num_experts_per_tok, dim=-1)
        if self.norm_topk_prob:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        if self.routing_weights_dtype == "input":
            weights_NK = weights_NK.to(logits_NE.dtype)
        if self.record_routing:
            # computed also when a checkpointed layer is recomputed (routing_sink None then): the
            # recomputation must save the tensors the first forward saved
            statistics = routing_statistics(logits_NE, self.num_experts_per_tok)
            if self.routing_sink is not None:
                self.routing_sink.append(statistics)
        return self.experts(x_ND, experts_NK, weights_NK).reshape(B, T, D)


class MoECausalLM(CausalLM):
    """The component library's `CausalLM` whose decoder layers hold routed MoE blocks
    (`SparseMoeBlock`, all of them or some: transformers' MixtralForCausalLM and
    Qwen3MoeForCausalLM), with the same arguments, state-dict names and protocol, plus:

    - `aux_loss()`: the auxiliary term the training loss adds for the last forward,
      `router_aux_loss_coef * load_balancing_loss(...)` over every MoE layer's routing (as
      transformers adds it with `output_router_logits`); None when `output_router_logits` is
      false or no layer routes. The trainers add it to each micro-batch's loss, the step's term
      being the mean over its forwards (`fgc_runtime.train.AuxLoss`); the pipeline trainer
      cannot (a stage holds only some layers) and refuses such a model.
    - `flops_per_token`: counts the parameters a token uses, the router and its top-k experts
      of each MoE layer, not every expert.
    - `init_weights`: the experts' 3-D weights are drawn like Linear weights (N(0,
      initializer_range), seeded by their names, unless an `init_rules` pattern matches them).
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory,
        norm_factory,
        positions: nn.Module,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        init_rules: tuple[tuple[str, float | str], ...] = (),
        embedding_multiplier: float | None = None,
        logits_scaling: float = 1.0,
        final_logit_softcapping: float | None = None,
        router_aux_loss_coef: float = 0.001,
        output_router_logits: bool = True,
    ):
        super().__init__(
            vocab_size,
            hidden_size,
            num_hidden_layers,
            layer_factory,
            norm_factory,
            positions,
            tie_word_embeddings=tie_word_embeddings,
            initializer_range=initializer_range,
            init_rules=init_rules,
            embedding_multiplier=embedding_multiplier,
            logits_scaling=logits_scaling,
            final_logit_softcapping=final_logit_softcapping,
        )
        experts = sorted({block.num_experts for block in self.moe_blocks()})
        if len(experts) > 1:
            raise ValueError(
                f"MoECausalLM: every MoE layer needs the same number of experts (the load-balancing "
                f"loss pools them), got {', '.join(map(str, experts))}"
            )
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.routing = (
            []
        )  # the routing statistics of the last forward, one per MoE layer

    def moe_blocks(self) -> list[SparseMoeBlock]:
        """The routed MoE blocks of the decoder layers, in order."""
        return [m for m in self.modules() if isinstance(m, SparseMoeBlock)]

    @torch.no_grad()
    def init_weights(self) -> None:
        """`CausalLM.init_weights`, with the experts' `gate_up_proj` and `down_proj` drawn like
        Linear weights: N(0, initializer_range) from a generator seeded by the parameter's name,
        unless an `init_rules` pattern matches them first."""
        user_rules = self.init_rules
        experts = tuple(
            ("^" + re.escape(f"{name}.{param}") + "$", self.initializer_range)
            for name, module in self.named_modules()
            if isinstance(module, SwiGLUExperts)
            for param in ("gate_up_proj", "down_proj")
        )
        self.init_rules = user_rules + experts
        try:
            super().init_weights()
        finally:
            self.init_rules = user_rules

    def hidden_states(
        self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`CausalLM.hidden_states`, recording each MoE layer's routing statistics for
        `aux_loss()` (only during this call: a recomputation under activation checkpointing
        records nothing)."""
        blocks = self.moe_blocks()
        records = []
        for block in blocks:
            block.record_routing = bool(self.output_router_logits)
            block.routing_sink = records
        try:
            return super().hidden_states(input_ids_BT, document_ids_BT)
        finally:
            for block in blocks:
                block.routing_sink = None
            self.routing = records

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss of the last forward that the training loss adds:
        `router_aux_loss_coef * load_balancing_loss` over the MoE layers (a mean over the
        forward's tokens, fp32). None when the model adds none (`output_router_logits` false, or
        no MoE layer); zero before the first forward."""
        blocks = self.moe_blocks()
        if not self.output_router_logits or not blocks:
            return None
        if not self.routing:
            return torch.zeros((), device=self.lm_head.weight.device)
        return self.router_aux_loss_coef * load_balancing_loss(
            self.routing, blocks[0].num_experts
        )

    def flops_per_token(self, seq_len: int) -> tuple[float, str]:
        """Training FLOPs per token at SEQ_LEN and the formula with its numbers: `6N + 12*L*H*T`
        as `CausalLM` counts it, with N the parameters in matmuls that one token uses: in each
        MoE layer the router and its top-k experts, not the other experts."""
        lookups = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        head = self.lm_head.weight
        total = sum(
            p.numel() for p in self.parameters() if id(p) not in lookups or p is head
        )
        blocks = self.moe_blocks()
        unused = sum(
            (b.num_experts - b.num_experts_per_tok)
            * (b.experts.gate_up_proj[0].numel() + b.experts.down_proj[0].numel())
            for b in blocks
        )
        n = total - unused
        L, H = self.num_hidden_layers, self.hidden_size
        value = 6 * n + 12 * L * H * seq_len
        routed = (
            f"the router and {blocks[0].num_experts_per_tok} of {blocks[0].num_experts} experts in each of "
            f"{len(blocks)} MoE layers; {total:,} in all"
            if blocks
            else "no MoE layer"
        )
        formula = (
            f"6*N + 12*L*H*T = 6*{n:,} + 12*{L}*{H}*{seq_len} = {value:,.0f}"
            f"  (N: parameters in matmuls one token uses: {routed}; L layers, H width, T sequence length)"
        )
        return float(value), formula
