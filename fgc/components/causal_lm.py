"""Decoder-only causal language model assembled from component factories.

Shape legend: B batch, T sequence, D hidden size, E head dim, V vocabulary size,
S key positions (= T).
"""

import re
import zlib
from typing import Callable

import torch
from torch import nn

from fgc.components.rotary import RotaryEmbedding


def packed_document_positions_and_mask(document_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


class DecoderStack(nn.Module):
    """Token embedding, a stack of decoder layers and a final norm (transformers' LlamaModel).

    `layer_factory(hidden_size=...)` is called once per layer, so layers never share weights;
    the rotary embedding is one module, shared by all layers.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        rotary_embedding: RotaryEmbedding,
    ):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList([layer_factory(hidden_size=hidden_size) for _ in range(num_hidden_layers)])
        self.norm = norm_factory(hidden_size)
        self.rotary_emb = rotary_embedding

    def forward(self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids_BT.shape
        x_BTD = self.embed_tokens(input_ids_BT)
        if document_ids_BT is None:
            position_ids_BT = torch.arange(T, device=input_ids_BT.device).unsqueeze(0).expand(B, T)
            attn_mask_B1TS = None  # plain causal attention
        else:
            position_ids_BT, attn_mask_B1TS = packed_document_positions_and_mask(document_ids_BT)
        # Computed once per forward and passed to every layer, as transformers does.
        cos_BTE, sin_BTE = self.rotary_emb(position_ids_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_BTE, sin_BTE, attn_mask_B1TS)
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
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        layer_factory: Callable[..., nn.Module],
        norm_factory: Callable[..., nn.Module],
        rotary_embedding: RotaryEmbedding,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        init_rules: tuple[tuple[str, float | str], ...] = (),
    ):
        super().__init__()
        for pattern, rule in init_rules:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"CausalLM: init_rules pattern {pattern!r} is not a valid regex: {err}") from None
            if rule not in ("zeros", "ones") and (isinstance(rule, (str, bool)) or rule < 0):
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
        self.model = DecoderStack(
            vocab_size, hidden_size, num_hidden_layers, layer_factory, norm_factory, rotary_embedding
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
                tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                if tensors and all(t.is_meta for t in tensors):
                    continue
                dtypes = {name: b.dtype for name, b in module.named_buffers(recurse=False)}
                module.reset_parameters()
                # a buffer recomputed in fp32 keeps the dtype the model was cast to
                for name, b in list(module.named_buffers(recurse=False)):
                    if name in dtypes and b.dtype != dtypes[name]:
                        setattr(module, name, b.to(dtypes[name]))
        base = torch.initial_seed()
        for name, param in self.named_parameters():
            if param.is_meta:
                continue
            rule = next((rule for pattern, rule in self.init_rules if re.search(pattern, name)), None)
            if rule is None:
                rule = default.get(id(param))
            if rule == "zeros":
                nn.init.zeros_(param)
            elif rule == "ones":
                nn.init.ones_(param)
            elif rule is not None:
                device = param.device
                generator = torch.Generator(device=device)
                generator.manual_seed((base + 1_000_003 * zlib.crc32(name.encode())) % 2**63)
                values = torch.empty(param.shape, dtype=torch.float32, device=device)
                values.normal_(mean=0.0, std=rule, generator=generator)
                # a DTensor (FSDP2, tensor parallel) gets this rank's shard of the values
                if hasattr(param, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    values = distribute_tensor(values, param.device_mesh, param.placements, src_data_rank=None)
                param.copy_(values)

    def forward(self, input_ids_BT: torch.Tensor, document_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.model(input_ids_BT, document_ids_BT))
