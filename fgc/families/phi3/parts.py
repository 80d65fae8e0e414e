"""Phi-3's own part: LongRoPE, the rotary scaling of Phi-3's long-context models (transformers'
"longrope" rope type, with the numbers of its `_compute_longrope_parameters` and
`longrope_frequency_update`).

Shape legend: B batch, T sequence, D rotary dim, F rotary dim / 2 (one frequency per channel pair).
"""

import math
from typing import Sequence

import torch

from fgc.components.rotary import RotaryEmbedding, _rotary_tables


class Phi3LongRoPEEmbedding(RotaryEmbedding):
    """LongRoPE: each channel pair's frequency divided by its own factor, from `short_factor` when
    a forward's positions all lie below `original_max_position_embeddings` and from
    `long_factor` otherwise (chosen per forward from its largest position, as transformers
    does); cos and sin are multiplied by `attention_factor`.

    `attention_factor` defaults to `sqrt(1 + ln(s) / ln(original_max_position_embeddings))`, or 1
    when s <= 1, where s is `factor`, or `max_position_embeddings /
    original_max_position_embeddings` when no factor is given (Phi-3's configs give none).
    `head_dim` is the number of channels that rotate (all of a head's, or the first
    `partial_rotary_factor` of them); each factor list has one entry per channel pair.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        *,
        short_factor: Sequence[float],
        long_factor: Sequence[float],
        original_max_position_embeddings: int,
        factor: float | None = None,
        attention_factor: float | None = None,
    ):
        super().__init__(head_dim, max_position_embeddings, rope_theta)
        for name, values in (
            ("short_factor", short_factor),
            ("long_factor", long_factor),
        ):
            if len(values) != head_dim // 2:
                raise ValueError(
                    f"Phi3LongRoPEEmbedding: {name} must have one entry per rotary channel pair "
                    f"({head_dim // 2}), got {len(values)}"
                )
        if original_max_position_embeddings < 1:
            raise ValueError(
                "Phi3LongRoPEEmbedding: original_max_position_embeddings must be at least 1, "
                f"got {original_max_position_embeddings}"
            )
        self.short_factor = tuple(float(x) for x in short_factor)
        self.long_factor = tuple(float(x) for x in long_factor)
        self.original_max_position_embeddings = original_max_position_embeddings
        self.factor = factor
        scale = (
            factor
            if factor is not None
            else max_position_embeddings / original_max_position_embeddings
        )
        if attention_factor is None:
            attention_factor = (
                1.0
                if scale <= 1.0
                else math.sqrt(
                    1 + math.log(scale) / math.log(original_max_position_embeddings)
                )
            )
        self.attention_factor = float(attention_factor)
        # Non-persistent like inv_freq (the short factors' frequencies): derived, not weights.
        self.register_buffer(
            "long_inv_freq", torch.empty(head_dim // 2), persistent=False
        )
        self.reset_parameters()

    def _scaled_inv_freq(self, factors: tuple[float, ...]) -> torch.Tensor:
        """`1 / (factor_i * rope_theta ** (2i / D))` for each channel pair i, fp32, on the CPU,
        computed as transformers computes it."""
        exponents_F = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device="cpu").float()
            / self.head_dim
        )
        return 1.0 / (
            torch.tensor(factors, dtype=torch.float32, device="cpu")
            * self.rope_theta**exponents_F
        )

    def compute_inv_freq(self) -> torch.Tensor:
        """The short factors' inverse frequencies, fp32, on the CPU."""
        return self._scaled_inv_freq(self.short_factor)

    def reset_parameters(self) -> None:
        """Recompute both buffers in fp32 (after `to_empty()` from the meta device, or a cast)."""
        super().reset_parameters()
        self.long_inv_freq = self._scaled_inv_freq(self.long_factor).to(
            self.long_inv_freq.device
        )

    @torch.no_grad()
    def forward(
        self, position_ids_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = position_ids_BT.max() + 1
        # a choice by tensor, not by Python branch, so torch.compile keeps one graph
        inv_freq_F = torch.where(
            seq_len > self.original_max_position_embeddings,
            self.long_inv_freq.to(position_ids_BT.device),
            self.inv_freq.to(position_ids_BT.device),
        )
        cos_BTD, sin_BTD = _rotary_tables(inv_freq_F, position_ids_BT)
        return cos_BTD * self.attention_factor, sin_BTD * self.attention_factor

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, original_max_position_embeddings={self.original_max_position_embeddings}, "
            f"attention_factor={self.attention_factor}"
        )
