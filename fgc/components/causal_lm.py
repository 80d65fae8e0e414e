"""Decoder-only causal language model assembled from component factories.

Shape legend: B batch, T sequence, D hidden size, E head dim, V vocabulary size.
"""

from typing import Callable

import torch
from torch import nn

from fgc.components.rotary import RotaryEmbedding


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

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = input_ids_BT.shape
        x_BTD = self.embed_tokens(input_ids_BT)
        position_ids_BT = torch.arange(T, device=input_ids_BT.device).unsqueeze(0).expand(B, T)
        # Computed once per forward and passed to every layer, as transformers does.
        cos_BTE, sin_BTE = self.rotary_emb(position_ids_BT)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos_BTE, sin_BTE)
        return self.norm(x_BTD)


class CausalLM(nn.Module):
    """Decoder stack plus a linear LM head; state-dict keys equal transformers' LlamaForCausalLM.

    With `tie_word_embeddings` the head reuses the embedding matrix (both keys stay in the state
    dict, as in transformers). Weights are initialised like Llama's `_init_weights`.
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
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
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
        with a `reset_parameters` (norms: ones; rotary: recomputed buffer) resets itself."""
        std = self.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids_BT))
