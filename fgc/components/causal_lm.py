"""Decoder-only causal language model assembled from component factories.

Shape legend: B batch, T sequence, D hidden size, E head dim, V vocabulary size,
S key positions (= T).
"""

import re
import zlib
from typing import Callable, Sequence

import torch
from torch import nn

from fgc.components.positions import LayerContext


def packed_document_positions_and_mask(
    document_ids_BT: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask for rows holding several documents back to back.

    A document is a run of equal ids in a row of `document_ids_BT`. Returns the position of each
    token within its document (0 at each document's first token) and the boolean
    block-diagonal causal mask `(B, 1, T, S)`: query t may attend key s when `s <= t` and s is
    in t's document.
    """
    B, T = document_ids_BT.shape
    index_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    starts_doc_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_doc_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    # the index of the first token of each token's document
    doc_start_BT = torch.where(starts_doc_BT, index_BT, 0).cummax(dim=1).values
    position_ids_BT = index_BT - doc_start_BT
    key_S = torch.arange(T, device=document_ids_BT.device)
    mask_BTS = (key_S <= index_BT[..., None]) & (key_S >= doc_start_BT[..., None])
    return position_ids_BT, mask_BTS[:, None]


def positions_and_mask(
    input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The position of each token and the attention mask of a forward: `0..T-1` in every row and
    None (plain causal attention) without document ids; with them, positions restarting at each
    document and the block-diagonal mask (`packed_document_positions_and_mask`)."""
    if document_ids_BT is None:
        B, T = input_ids_BT.shape
        return (
            torch.arange(T, device=input_ids_BT.device).unsqueeze(0).expand(B, T),
            None,
        )
    return packed_document_positions_and_mask(document_ids_BT)


class DecoderStack(nn.Module):
    """Token embedding, positions, a stack of decoder layers and a final norm (transformers'
    LlamaModel).

    `layer_factory(hidden_size=...)` is called once per layer, so layers never share weights; a
    list of factories, one per layer, gives layers of different kinds (sliding-window and full
    attention, layers with and without rotary). `positions` is one part shared by all layers
    (rotary, learned or none): what it adds to the embeddings (`positions.embed`) and the rotary
    tables it hands the layers (`positions.tables`, in the `LayerContext` every layer is called
    with). `embedding_multiplier` scales the token embeddings (Gemma's sqrt(hidden_size),
    Granite's embedding_multiplier), in their dtype.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module] | Sequence[Callable[..., nn.Module]],
        norm_factory: Callable[..., nn.Module],
        positions: nn.Module,
        embedding_multiplier: float | None = None,
    ):
        super().__init__()
        factories = (
            list(layer_factory)
            if isinstance(layer_factory, (list, tuple))
            else [layer_factory] * num_hidden_layers
        )
        if len(factories) != num_hidden_layers:
            raise ValueError(
                f"DecoderStack: {len(factories)} layer factories for num_hidden_layers {num_hidden_layers}: "
                "give one factory, or one per layer"
            )
        self.embedding_multiplier = embedding_multiplier
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.positions = positions
        self.layers = nn.ModuleList(
            [factory(hidden_size=hidden_size) for factory in factories]
        )
        self.norm = norm_factory(hidden_size)

    def embed(
        self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor
    ) -> torch.Tensor:
        """The token embeddings (scaled by `embedding_multiplier`) with what the positions add."""
        x_BTD = self.embed_tokens(input_ids_BT)
        if self.embedding_multiplier is not None:
            # the multiplier in the embeddings' dtype first, as transformers' Gemma does
            x_BTD = x_BTD * torch.tensor(self.embedding_multiplier, dtype=x_BTD.dtype)
        return self.positions.embed(x_BTD, position_ids_BT)

    def layer_context(
        self, position_ids_BT: torch.Tensor, attn_mask_B1TS: torch.Tensor | None = None
    ) -> LayerContext:
        """The context every layer of one forward is called with: the positions' rotary tables
        (computed once, as transformers does) and the attention mask (None: causal)."""
        return LayerContext(self.positions.tables(position_ids_BT), attn_mask_B1TS)

    def run_layers(
        self, x_BTD: torch.Tensor, ctx: LayerContext, indices=None
    ) -> torch.Tensor:
        """X through the decoder layers in order: all of them, or those at INDICES (a pipeline
        stage's)."""
        layers = self.layers if indices is None else [self.layers[i] for i in indices]
        for layer in layers:
            x_BTD = layer(x_BTD, ctx)
        return x_BTD

    def forward(
        self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        position_ids_BT, attn_mask_B1TS = positions_and_mask(
            input_ids_BT, document_ids_BT
        )
        x_BTD = self.embed(input_ids_BT, position_ids_BT)
        x_BTD = self.run_layers(
            x_BTD, self.layer_context(position_ids_BT, attn_mask_B1TS)
        )
        return self.norm(x_BTD)


class CausalLM(nn.Module):
    """Decoder stack plus a linear LM head; state-dict keys equal transformers' LlamaForCausalLM.

    With `tie_word_embeddings` the head reuses the embedding matrix (both keys stay in the state
    dict, as in transformers). Weights are initialised like Llama's `_init_weights`, then by
    `init_rules`: `(regex, rule)` pairs tried in order against each parameter name (as
    `named_parameters()` gives it, e.g. `model.layers.0.self_attn.o_proj.weight`; a tied head
    is `model.embed_tokens.weight`); the first regex that `re.search` finds in the name decides,
    with `rule` a standard deviation (normal with mean 0), `"zeros"` or `"ones"` (see
    `init_weights`: each parameter's random values depend only on the seed and its name).

    `forward(input_ids_BT)` gives the logits; with `document_ids_BT` (same shape, ints), each
    row is a sequence of documents (runs of equal ids): tokens attend only within their
    document, and positions restart at 0 at each document's first token.

    The rest of fgc (the trainers' parallelism, the pipeline, the chunked loss, the FLOPs count,
    kernel selection) asks the model through these methods instead of reading its attributes:
    `decoder_layers`, `embed`, `layer_context`, `run_layers`, `final_hidden`, `head`,
    `hidden_states`, `output_projection`, `stage_modules`, `flops_per_token`, `init_weights`.
    `forward` is `head(hidden_states(...))`, and `hidden_states` is `embed`, `run_layers` over
    a `layer_context` and `final_hidden`, so a pipeline stage that runs a slice of the layers
    computes exactly what the whole model does.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        positions: nn.Module,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        init_rules: tuple[tuple[str, float | str], ...] = (),
        embedding_multiplier: float | None = None,
        logits_scaling: float = 1.0,
        final_logit_softcapping: float | None = None,
    ):
        super().__init__()
        for pattern, rule in init_rules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"CausalLM: init_rules pattern {pattern!r} is not a valid regex: {err}"
                ) from None
            if rule not in ("zeros", "ones") and (
                isinstance(rule, (str, bool)) or rule < 0
            ):
                raise ValueError(
                    f"CausalLM: init_rules rule for {pattern!r} must be a standard deviation >= 0, "
                    f"'zeros' or 'ones', got {rule!r}"
                )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.init_rules = tuple((pattern, rule) for pattern, rule in init_rules)
        self.logits_scaling = logits_scaling
        self.final_logit_softcapping = final_logit_softcapping
        self.model = DecoderStack(
            vocab_size,
            hidden_size,
            num_hidden_layers,
            layer_factory,
            norm_factory,
            positions,
            embedding_multiplier,
        )
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear and Embedding weights ~ N(0, initializer_range), biases zero; every other module
        with a `reset_parameters` (norms: ones; rotary: recomputed buffer) resets itself; then
        the parameters that an `init_rules` pattern matches are set by the first such rule.

        Each random parameter draws from its own generator, seeded from `torch.initial_seed()`
        and the parameter's name: its values do not depend on which other parameters exist or
        in which order they are initialised. So a rank that materialises only its share of a
        model built on the meta device (a pipeline stage, an FSDP2 or tensor-parallel shard)
        gives it the values the whole model would have. Tensors still on the meta device are
        skipped; a DTensor parameter gets its shard of the full tensor's values.
        """
        std = self.initializer_range
        # id(param) -> its rule when no init_rules pattern matches
        default: dict[int, float | str] = {}
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                default[id(module.weight)] = std
                if getattr(module, "bias", None) is not None:
                    default[id(module.bias)] = "zeros"
            elif module is not self and hasattr(module, "reset_parameters"):
                tensors = list(module.parameters(recurse=False)) + list(
                    module.buffers(recurse=False)
                )
                if tensors and all(t.is_meta for t in tensors):
                    continue
                dtypes = {
                    name: b.dtype for name, b in module.named_buffers(recurse=False)
                }
                module.reset_parameters()
                # a buffer recomputed in fp32 keeps the dtype the model was cast to
                for name, b in list(module.named_buffers(recurse=False)):
                    if name in dtypes and b.dtype != dtypes[name]:
                        setattr(module, name, b.to(dtypes[name]))
        base = torch.initial_seed()
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            rule = next(
                (rule for pattern, rule in self.init_rules if re.search(pattern, name)),
                None,
            )
            if rule is None:
                rule = default.get(id(param))
            if rule == "zeros":
                nn.init.zeros_(param)
            elif rule == "ones":
                nn.init.ones_(param)
            elif rule is not None:
                device = param.device
                generator = torch.Generator(device=device)
                generator.manual_seed(
                    (base + 1_000_003 * zlib.crc32(name.encode())) % 2**63
                )
                values = torch.empty(param.shape, dtype=torch.float32, device=device)
                values.normal_(mean=0.0, std=rule, generator=generator)
                # a DTensor (FSDP2, tensor parallel) gets this rank's shard of the values
                if hasattr(param, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    values = distribute_tensor(
                        values, param.device_mesh, param.placements, src_data_rank=None
                    )
                param.copy_(values)

    # -- what the rest of fgc asks the model ---------------------------------------------------

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in order (the units of activation checkpointing, compile, FSDP2,
        tensor parallelism and pipeline stages)."""
        return self.model.layers

    def embed(
        self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor
    ) -> torch.Tensor:
        """`(B, T, D)`: the token embeddings with what the positions add to them."""
        return self.model.embed(input_ids_BT, position_ids_BT)

    def layer_context(
        self, position_ids_BT: torch.Tensor, attn_mask_B1TS: torch.Tensor | None = None
    ) -> LayerContext:
        """The context every decoder layer of one forward is called with (`layer(x_BTD, ctx)`)."""
        return self.model.layer_context(position_ids_BT, attn_mask_B1TS)

    def run_layers(
        self, x_BTD: torch.Tensor, ctx: LayerContext, indices=None
    ) -> torch.Tensor:
        """X through the decoder layers: all of them, or those at INDICES, in order."""
        return self.model.run_layers(x_BTD, ctx, indices)

    def final_hidden(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The final norm of the last layer's output."""
        return self.model.norm(x_BTD)

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """`(B, T, V)` logits of final-normed hidden states: the LM head, divided by
        `logits_scaling` (Granite), then soft-capped at `final_logit_softcapping`
        (`c * tanh(logits / c)`, Gemma 2)."""
        logits_BTV = self.lm_head(x_BTD)
        if self.logits_scaling != 1.0:
            logits_BTV = logits_BTV / self.logits_scaling
        if self.final_logit_softcapping is not None:
            c = self.final_logit_softcapping
            logits_BTV = torch.tanh(logits_BTV / c) * c
        return logits_BTV

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """`(weight_VD, bias_V or None)` of the head when it is exactly `x @ weight.T + bias` (the
        chunked loss computes the logits a chunk at a time from them); None when the head also
        scales or soft-caps its logits."""
        if self.logits_scaling != 1.0 or self.final_logit_softcapping is not None:
            return None
        return self.lm_head.weight, self.lm_head.bias

    def hidden_states(
        self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`(B, T, D)`: the final-normed hidden states the head turns into logits (document ids:
        see the class docstring)."""
        position_ids_BT, attn_mask_B1TS = positions_and_mask(
            input_ids_BT, document_ids_BT
        )
        x_BTD = self.embed(input_ids_BT, position_ids_BT)
        x_BTD = self.run_layers(
            x_BTD, self.layer_context(position_ids_BT, attn_mask_B1TS)
        )
        return self.final_hidden(x_BTD)

    def stage_modules(self, first: bool, last: bool) -> dict[str, nn.Module]:
        """The modules besides decoder layers that a pipeline stage holds, by their full dotted
        names: the embedding and the positions on the FIRST stage, the final norm and the head on
        the LAST; positions without parameters (rotary tables, none) on every stage, which
        computes its own tables."""
        modules: dict[str, nn.Module] = {}
        if first:
            modules["model.embed_tokens"] = self.model.embed_tokens
        if first or not any(True for _ in self.model.positions.parameters()):
            modules["model.positions"] = self.model.positions
        if last:
            modules["model.norm"] = self.model.norm
            modules["lm_head"] = self.lm_head
        return modules

    def flops_per_token(self, seq_len: int) -> tuple[float, str]:
        """Training FLOPs per token at SEQ_LEN, and the formula with its numbers:
        `6N + 12*L*H*T`. N counts the parameters used in matmuls (all but the lookup tables of
        the token and position embeddings; a head tied to the embedding counts once): the
        forward (2N) and backward (4N); 12*L*H*T is the attention scores and weighted sum (PaLM,
        appendix B), for L layers, width H and sequence length T."""
        lookups = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        head = self.lm_head.weight
        n = sum(
            p.numel() for p in self.parameters() if id(p) not in lookups or p is head
        )
        L, H = self.num_hidden_layers, self.hidden_size
        value = 6 * n + 12 * L * H * seq_len
        formula = (
            f"6*N + 12*L*H*T = 6*{n:,} + 12*{L}*{H}*{seq_len} = {value:,.0f}"
            "  (N: parameters in matmuls, L layers, H width, T sequence length)"
        )
        return float(value), formula

    def forward(
        self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.hidden_states(input_ids_BT, document_ids_BT))
