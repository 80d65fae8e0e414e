"""A model part of this example's own: the squared-ReLU feed-forward of Primer (So et al. 2021).

`fgc build` copies this class into the package's model.py, so the package needs only torch.
"""

import torch
from torch import nn


class ReluSquaredMLP(nn.Module):
    """`down(relu(up(x)) ** 2)`: one projection in, one out, no gate."""

    # the same declarations as the library's MLPs (docs/components.md, "What the parts declare"):
    # under tensor parallelism `up` splits by output features, `down` by input features
    tp_plan = {"up_proj": "colwise", "down_proj": "rowwise"}
    tp_divisible = ("intermediate_size",)

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The MLP of each position of X_BTD (batch, sequence, hidden)."""
        return self.down_proj(torch.relu(self.up_proj(x_BTD)).square())
