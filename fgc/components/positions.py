"""Positions as a pluggable part of the decoder stack, and the context every layer is handed.

A positions part has two methods, so the stack never needs to know which kind it holds:
- `embed(x_BTD, position_ids_BT) -> x_BTD`: what the positions add to the token embeddings
  (learned absolute positions add theirs; the others return x as it is);
- `tables(position_ids_BT) -> (cos_BTE, sin_BTE) | None`: the rotary tables the attention
  rotates queries and keys with, or None.
The parts are `RotaryEmbedding` and its scaled variants (`fgc.components.rotary`),
`LearnedPositionalEmbedding` and `NoPositions`.

`LayerContext` is what a forward computes once and hands to every decoder layer
(`layer(x_BTD, ctx)`): the rotary tables and the attention mask. A layer passes it on to its
attention without looking inside; the attention calls `ctx.rotate(q, k, impl)` and reads
`ctx.attn_mask_B1TS`.

Shape legend: B batch, T sequence, D hidden size, H query heads, K key/value heads, E head dim,
S key positions (= T).
"""

import torch
from torch import nn

from fgc_runtime.kernels import apply_rope


class LayerContext:
    """What every decoder layer of one forward shares: the rotary tables of the positions
    (`(cos_BTE, sin_BTE)`, fp32, or None without rotary positions) and the attention mask
    (`attn_mask_B1TS`: None for plain causal attention, or a boolean mask, True where a query may
    attend a key, e.g. the block-diagonal mask of packed documents)."""

    def __init__(
        self,
        rotary_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask_B1TS: torch.Tensor | None = None,
    ):
        self.rotary_tables = rotary_tables
        self.attn_mask_B1TS = attn_mask_B1TS

    def rotate(
        self, q_BHTE: torch.Tensor, k_BKTE: torch.Tensor, impl: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys rotated by the rotary tables (`fgc_runtime.kernels.apply_rope` with
        IMPL); unchanged without tables."""
        if self.rotary_tables is None:
            return q_BHTE, k_BKTE
        cos_BTE, sin_BTE = self.rotary_tables
        # The tables are fp32; cast them so a bf16 model keeps bf16 q/k, as transformers does.
        return apply_rope(
            q_BHTE,
            k_BKTE,
            cos_BTE.to(q_BHTE.dtype),
            sin_BTE.to(q_BHTE.dtype),
            impl=impl,
        )


class LearnedPositionalEmbedding(nn.Embedding):
    """Learned absolute positions (GPT-2's `wpe`): position p adds row p of `weight`
    (`(max_position_embeddings, hidden_size)`) to the token embedding; no rotary tables.
    Positions must be below `max_position_embeddings`."""

    def __init__(self, max_position_embeddings: int, hidden_size: int):
        super().__init__(max_position_embeddings, hidden_size)
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size

    def embed(self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """The token embeddings plus each position's learned vector."""
        return x_BTD + self(position_ids_BT)

    def tables(self, position_ids_BT: torch.Tensor) -> None:
        """None: learned positions rotate nothing."""
        return None


class NoPositions(nn.Module):
    """No position information at all (NoPE): the embeddings pass through, and there are no
    rotary tables; causal attention alone tells the tokens apart."""

    def embed(self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """X as it is."""
        return x_BTD

    def tables(self, position_ids_BT: torch.Tensor) -> None:
        """None: nothing to rotate."""
        return None
