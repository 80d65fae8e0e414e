"""Helpers of the training loop; the loop itself is written out in each generated ``train.py``.

The loss of a step is ``(sum over micro-batches and ranks of token loss sums) / (global count of
non-ignored targets in the step)``: every target token weighs the same, however the batch is split
into micro-batches and ranks. :func:`loss_sum_and_count` gives the two parts.

Gradient clipping: the trainer calls ``torch.nn.utils.clip_grad_norm_`` itself (it returns the
pre-clip norm); :func:`grad_norm` is for measuring without clipping.
"""

from __future__ import annotations

import math
import random
import sys
import time
from typing import Iterable

import torch
import torch.nn.functional as F

try:
    import resource
except ImportError:  # not on Windows
    resource = None


def set_seed(seed: int) -> None:
    """Seed Python's ``random`` and torch (CPU and, when present, every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def loss_sum_and_count(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies (fp32) over non-ignored targets, and their count (int64).

    ``logits`` is ``(..., V)`` and ``labels`` the matching ``(...)``; labels are already shifted.
    """
    logits_NV = logits.reshape(-1, logits.shape[-1]).float()
    labels_N = labels.reshape(-1)
    loss_sum = F.cross_entropy(
        logits_NV, labels_N, ignore_index=ignore_index, reduction="sum"
    )
    count = (labels_N != ignore_index).sum(dtype=torch.int64)
    return loss_sum, count


def count_targets(labels: torch.Tensor, ignore_index: int = -100) -> int:
    """The number of labels that are not ``ignore_index``."""
    return int((labels != ignore_index).sum())


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay, as a multiplier of each group's base lr.

    Step ``s < warmup_steps`` gives ``(s + 1) / (warmup_steps + 1)`` (never 0, so step 0 learns);
    from ``warmup_steps`` to ``max_steps`` it falls as a cosine from 1 to ``min_lr_ratio``, and
    stays at ``min_lr_ratio`` after.
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        decay_steps = max_steps - warmup_steps
        if decay_steps <= 0 or step >= max_steps:
            return min_lr_ratio
        progress = (step - warmup_steps) / decay_steps
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr after an optional linear warmup (same warmup rule as :func:`warmup_cosine`)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def grad_norm(parameters: Iterable[torch.Tensor]) -> float:
    """Total L2 norm of the gradients of ``parameters`` (those without a grad are skipped)."""
    norms = [p.grad.detach().float().norm(2) for p in parameters if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.stack([n.to(norms[0].device) for n in norms]).norm(2))


class Throughput:
    """Counts tokens and wall time since construction."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last_time = self.start
        self.tokens = 0
        self._last_tokens = 0

    def update(self, tokens: int) -> dict:
        """Add ``tokens`` processed since the last call.

        Returns ``{"tokens": cumulative, "tokens_per_s": rate since the previous update,
        "elapsed_s": seconds since construction}``.
        """
        now = time.perf_counter()
        self.tokens += int(tokens)
        interval = now - self._last_time
        rate = (self.tokens - self._last_tokens) / interval if interval > 0 else 0.0
        self._last_time = now
        self._last_tokens = self.tokens
        return {
            "tokens": self.tokens,
            "tokens_per_s": rate,
            "elapsed_s": now - self.start,
        }


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory: CUDA ``max_memory_allocated`` on a GPU, else the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if resource is None:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def model_flops_per_token(
    num_params: int, num_layers: int, hidden_size: int, seq_len: int
) -> float:
    """Training FLOPs per token: ``6 * N + 12 * L * H * T``.

    ``6N`` is the forward (2N) and backward (4N) matmuls over ``N`` parameters; ``12 L H T`` is the
    attention scores and weighted sum (PaLM, appendix B), for ``L`` layers, width ``H`` and
    sequence length ``T``.
    """
    return 6.0 * num_params + 12.0 * num_layers * hidden_size * seq_len


# dense bf16 peak FLOP/s by device-name substring (first match wins)
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
)


def mfu(
    flops_per_token: float, tokens_per_s: float, device: torch.device
) -> float | None:
    """Model FLOPs utilisation of one device, or None on CPU or a GPU not in the peak table.

    ``tokens_per_s`` is this device's rate (divide a global rate by the world size first).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return flops_per_token * tokens_per_s / peak
    return None
