"""Rotary position embedding (RoPE) tables.

Shape legend: B batch, T sequence, D head dim, F head dim / 2 (one frequency per channel pair).
"""

import torch
from torch import nn


def _rotary_inv_freq(head_dim: int, rope_theta: float, device=None) -> torch.Tensor:
    """Inverse frequencies of the default RoPE, as transformers computes them (fp32).

    Computed on the CPU, then moved to DEVICE (default: the device the model is being built on),
    so building on the meta device stays cheap.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    return inv_freq.to(device if device is not None else torch.get_default_device())


class RotaryEmbedding(nn.Module):
    """Computes the cos/sin tables of default RoPE for given positions.

    Same numbers as transformers' LlamaRotaryEmbedding with the "default" rope type. One instance
    is shared by every layer of a model; it has no parameters and nothing in the state dict.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int = 2048, rope_theta: float = 10000.0):
        super().__init__()
        if head_dim % 2 != 0:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        # Non-persistent: derived from the hyperparameters, so checkpoints stay equal to HF's.
        self.register_buffer("inv_freq", _rotary_inv_freq(head_dim, rope_theta), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute the buffer in fp32, e.g. after `to_empty()` from the meta device or a cast to bf16."""
        # Assigning to a registered buffer name replaces the buffer and keeps it non-persistent.
        self.inv_freq = _rotary_inv_freq(self.head_dim, self.rope_theta, self.inv_freq.device)

    @torch.no_grad()
    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Always fp32: a bf16 angle loses whole radians at large positions.
        inv_freq_F = self.inv_freq.to(device=position_ids_BT.device, dtype=torch.float32)
        freqs_BTF = position_ids_BT[..., None].float() * inv_freq_F
        emb_BTD = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
        return emb_BTD.cos(), emb_BTD.sin()

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rope_theta={self.rope_theta}"
