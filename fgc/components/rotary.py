"""Rotary position embedding (RoPE) tables, plain and with the scaling variants of transformers.

A rotary embedding is a positions part (see `fgc.components.positions`): `tables(position_ids)`
gives the cos/sin tables the attention rotates queries and keys with, and `embed` leaves the
token embeddings as they are. Each variant is a class, so a config picks one by type (the
`rope_type` of a Hugging Face config's `rope_scaling`/`rope_parameters`): `RotaryEmbedding`
("default"), `LinearScalingRotaryEmbedding` ("linear"), `DynamicNTKRotaryEmbedding` ("dynamic"),
`YarnRotaryEmbedding` ("yarn") and `Llama3RotaryEmbedding` ("llama3"). Their numbers are those of
transformers' `modeling_rope_utils` for the same fields.

Shape legend: B batch, T sequence, D head dim, F head dim / 2 (one frequency per channel pair).
"""

import math

import torch
from torch import nn


def _default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """`1 / rope_theta ** (2i / head_dim)` for each channel pair i, in fp32 on the CPU, computed
    the way transformers computes it (so the tables agree bit for bit)."""
    exponents_F = (
        torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    )
    return 1.0 / (rope_theta**exponents_F)


def _rotary_tables(
    inv_freq_F: torch.Tensor, position_ids_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `position * inv_freq`, each frequency used for both halves of the head dim."""
    # Always fp32: a bf16 angle loses whole radians at large positions.
    inv_freq_F = inv_freq_F.to(device=position_ids_BT.device, dtype=torch.float32)
    freqs_BTF = position_ids_BT[..., None].float() * inv_freq_F
    emb_BTD = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
    return emb_BTD.cos(), emb_BTD.sin()


class RotaryEmbedding(nn.Module):
    """Computes the cos/sin tables of default RoPE for given positions.

    Same numbers as transformers' LlamaRotaryEmbedding with the "default" rope type. One instance
    is the positions part of a model, its tables computed once per forward for every layer; it
    has no parameters and nothing in the state dict.
    Scaled variants subclass it and override `compute_inv_freq` (and `forward` where the tables
    themselves change).
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # Non-persistent: derived from the hyperparameters, so checkpoints stay equal to HF's.
        # Built on the CPU, then moved to the device the model is being built on (cheap on meta).
        inv_freq_F = _default_inv_freq(head_dim, rope_theta)
        self.register_buffer(
            "inv_freq", inv_freq_F.to(torch.get_default_device()), persistent=False
        )

    def compute_inv_freq(self) -> torch.Tensor:
        """The inverse frequencies, fp32, on the CPU."""
        return _default_inv_freq(self.head_dim, self.rope_theta)

    def reset_parameters(self) -> None:
        """Recompute the buffer in fp32, e.g. after `to_empty()` from the meta device or a cast to bf16."""
        # Assigning to a registered buffer name replaces the buffer and keeps it non-persistent.
        self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)

    @torch.no_grad()
    def forward(
        self, position_ids_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _rotary_tables(self.inv_freq, position_ids_BT)

    def embed(self, x_BTD: torch.Tensor, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """X as it is: rotary positions act in the attention, not on the embeddings."""
        return x_BTD

    def tables(
        self, position_ids_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `(cos_BTD, sin_BTD)` tables of the positions, fp32 (this class's `forward`)."""
        return self(position_ids_BT)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rope_theta={self.rope_theta}"


class LinearScalingRotaryEmbedding(RotaryEmbedding):
    """RoPE with every position divided by `factor` (transformers' "linear" rope type)."""

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        *,
        factor: float,
    ):
        super().__init__(head_dim, max_position_embeddings, rope_theta)
        if factor <= 0:
            raise ValueError(
                f"LinearScalingRotaryEmbedding: factor must be positive, got {factor}"
            )
        self.factor = factor
        self.reset_parameters()

    def compute_inv_freq(self) -> torch.Tensor:
        # Dividing the frequencies is dividing the positions: angle = position * inv_freq.
        return _default_inv_freq(self.head_dim, self.rope_theta) / self.factor

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}"


class DynamicNTKRotaryEmbedding(RotaryEmbedding):
    """Dynamic NTK-aware RoPE (transformers' "dynamic" rope type).

    Up to `max_position_embeddings` positions it is the default RoPE. A forward whose largest
    position p is beyond that raises the base to
    `rope_theta * (factor * (p + 1) / max_position_embeddings - (factor - 1)) ** (D / (D - 2))`
    for that call, as transformers does for a model that has not seen longer inputs before
    (transformers also keeps the raised base for later, shorter calls; this class does not).
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        *,
        factor: float,
    ):
        super().__init__(head_dim, max_position_embeddings, rope_theta)
        if factor <= 0:
            raise ValueError(
                f"DynamicNTKRotaryEmbedding: factor must be positive, got {factor}"
            )
        self.factor = factor

    @torch.no_grad()
    def forward(
        self, position_ids_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = position_ids_BT.max() + 1
        if seq_len <= self.max_position_embeddings:
            return _rotary_tables(self.inv_freq, position_ids_BT)
        # The same tensor arithmetic as transformers (fp32), so the tables agree.
        dim = self.head_dim
        stretch = self.factor * seq_len / self.max_position_embeddings - (
            self.factor - 1
        )
        base = self.rope_theta * stretch ** (dim / (dim - 2))
        exponents_F = (
            torch.arange(
                0, dim, 2, dtype=torch.int64, device=position_ids_BT.device
            ).float()
            / dim
        )
        return _rotary_tables(1.0 / (base**exponents_F), position_ids_BT)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, factor={self.factor}"


class YarnRotaryEmbedding(RotaryEmbedding):
    """YaRN RoPE (transformers' "yarn" rope type; https://arxiv.org/abs/2309.00071).

    Channel pairs that turn fewer than `beta_slow` times over `original_max_position_embeddings`
    positions are interpolated (frequency / `factor`), those that turn more than `beta_fast` times
    are kept, and the pairs in between are blended linearly. cos and sin are multiplied by
    `attention_factor` (default `0.1 * ln(factor) + 1`, or the `mscale`/`mscale_all_dim` ratio).
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        *,
        factor: float,
        original_max_position_embeddings: int | None = None,
        attention_factor: float | None = None,
        beta_fast: float | None = None,
        beta_slow: float | None = None,
        mscale: float | None = None,
        mscale_all_dim: float | None = None,
        truncate: bool = True,
    ):
        super().__init__(head_dim, max_position_embeddings, rope_theta)
        if factor <= 0:
            raise ValueError(
                f"YarnRotaryEmbedding: factor must be positive, got {factor}"
            )
        self.factor = factor
        self.original_max_position_embeddings = (
            original_max_position_embeddings or max_position_embeddings
        )
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(
                    factor, mscale_all_dim
                )
            else:
                attention_factor = _yarn_mscale(factor)
        self.attention_factor = float(attention_factor)
        # transformers treats a missing (or zero) beta as its default
        self.beta_fast = beta_fast or 32
        self.beta_slow = beta_slow or 1
        self.truncate = truncate
        self.reset_parameters()

    def compute_inv_freq(self) -> torch.Tensor:
        dim, base = self.head_dim, self.rope_theta
        pos_freqs_F = base ** (
            torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        )
        extrapolated_F = 1.0 / pos_freqs_F
        interpolated_F = 1.0 / (self.factor * pos_freqs_F)
        low, high = self._correction_range()
        if low == high:
            high += 0.001  # a ramp of width zero
        ramp_F = (
            (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low)
            / (high - low)
        ).clamp(0, 1)
        extrapolation_share_F = 1 - ramp_F
        return (
            interpolated_F * (1 - extrapolation_share_F)
            + extrapolated_F * extrapolation_share_F
        )

    def _correction_range(self) -> tuple[float, float]:
        """The channel-pair indices where the blend from kept to interpolated starts and ends."""

        def pair_index(num_rotations: float) -> float:
            wavelength_ratio = self.original_max_position_embeddings / (
                num_rotations * 2 * math.pi
            )
            return (self.head_dim * math.log(wavelength_ratio)) / (
                2 * math.log(self.rope_theta)
            )

        low, high = pair_index(self.beta_fast), pair_index(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, self.head_dim - 1)

    @torch.no_grad()
    def forward(
        self, position_ids_BT: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos_BTD, sin_BTD = _rotary_tables(self.inv_freq, position_ids_BT)
        return cos_BTD * self.attention_factor, sin_BTD * self.attention_factor

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, factor={self.factor}, "
            f"original_max_position_embeddings={self.original_max_position_embeddings}, "
            f"attention_factor={self.attention_factor}"
        )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched SCALE times."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class Llama3RotaryEmbedding(RotaryEmbedding):
    """Llama 3.1's RoPE scaling (transformers' "llama3" rope type).

    Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are divided by
    `factor`, those shorter than `original_max_position_embeddings / high_freq_factor` are kept,
    and those in between are blended smoothly.
    """

    def __init__(
        self,
        head_dim: int,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        *,
        factor: float,
        low_freq_factor: float,
        high_freq_factor: float,
        original_max_position_embeddings: int | None = None,
    ):
        super().__init__(head_dim, max_position_embeddings, rope_theta)
        if factor <= 0:
            raise ValueError(
                f"Llama3RotaryEmbedding: factor must be positive, got {factor}"
            )
        if high_freq_factor <= low_freq_factor:
            raise ValueError(
                f"Llama3RotaryEmbedding: high_freq_factor ({high_freq_factor}) must be greater than "
                f"low_freq_factor ({low_freq_factor})"
            )
        self.factor = factor
        self.low_freq_factor = low_freq_factor
        self.high_freq_factor = high_freq_factor
        self.original_max_position_embeddings = (
            original_max_position_embeddings or max_position_embeddings
        )
        self.reset_parameters()

    def compute_inv_freq(self) -> torch.Tensor:
        inv_freq_F = _default_inv_freq(self.head_dim, self.rope_theta)
        old_context_len = self.original_max_position_embeddings
        low_freq_wavelen = old_context_len / self.low_freq_factor
        high_freq_wavelen = old_context_len / self.high_freq_factor
        wavelen_F = 2 * math.pi / inv_freq_F
        # long wavelengths: interpolate (divide the frequency by factor); short ones: keep
        scaled_F = torch.where(
            wavelen_F > low_freq_wavelen, inv_freq_F / self.factor, inv_freq_F
        )
        # in between: blend the two smoothly
        smooth_F = (old_context_len / wavelen_F - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed_F = (1 - smooth_F) * scaled_F / self.factor + smooth_F * scaled_F
        is_medium_F = ~(wavelen_F < high_freq_wavelen) * ~(wavelen_F > low_freq_wavelen)
        return torch.where(is_medium_F, smoothed_F, scaled_F)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, factor={self.factor}, low_freq_factor={self.low_freq_factor}, "
            f"high_freq_factor={self.high_freq_factor}, "
            f"original_max_position_embeddings={self.original_max_position_embeddings}"
        )
