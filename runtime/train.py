"""Helpers of the training loop; the loop itself is written out in each generated ``train.py``.

The loss of a step is ``(sum over micro-batches and ranks of token loss sums) / (global count of
non-ignored targets in the step)``: every target token weighs the same, however the batch is split
into micro-batches and ranks. :func:`loss_sum_and_count` gives the two parts.

A model with an auxiliary loss (the model protocol's ``aux_loss()``: a routed mixture of experts'
load-balancing term, ``router_aux_loss_coef`` times it) adds it to that loss: the step minimises
``token loss + mean over the step's forwards of aux_loss()``, a forward being one micro-batch of
one data-parallel rank (of one tensor-parallel group: its ranks compute the same forward). Each
forward's ``aux_loss()`` is the model's value for that micro-batch alone, as transformers computes
it for one batch: the term is a product of two means over the batch's tokens, so a batch split into
micro-batches and ranks gives the mean of their values, not the value of the whole batch at once
(which would need every micro-batch's routing before the first backward). :class:`AuxLoss` adds
each forward's share and gives the step's term for the metrics (``aux_loss``).

Gradient clipping: the trainer calls ``torch.nn.utils.clip_grad_norm_`` itself (it returns the
pre-clip norm); :func:`grad_norm` is for measuring without clipping.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import re
import sys
import time
from typing import Iterable, Literal

import torch
import torch.nn.functional as F

from .parallel import has_method

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


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse ``type``: a whole number from MINIMUM (to MAXIMUM), so that a flag cannot take
    a value the config could not (the ranges of fgc's settings: ``--log-every -1`` is an error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {value}")
        return value

    parse.__name__ = "whole number"  # argparse names the type in its messages
    return parse


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


BudgetUnit = Literal["steps", "tokens"]
DecayShape = Literal["linear", "1-sqrt", "cosine"]


class ScheduleError(ValueError):
    """A learning-rate schedule argument that makes no sense; ``argument`` names it."""

    def __init__(self, argument: str, message: str):
        self.argument = argument
        super().__init__(f"{argument} {message}")


def _unit(budget_unit: str, tokens_per_step: int | None) -> int:
    """How much of the budget one optimizer step uses: 1 (steps) or the tokens per step."""
    if budget_unit == "steps":
        return 1
    if budget_unit != "tokens":
        raise ScheduleError("budget_unit", f"expected 'steps' or 'tokens', got {budget_unit!r}")
    if tokens_per_step is None or tokens_per_step < 1:
        raise ScheduleError(
            "tokens_per_step",
            f"a token budget needs the tokens per step (global batch x seq_len), got {tokens_per_step!r}",
        )
    return int(tokens_per_step)


def _check(argument: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ScheduleError(argument, f"{expected}, got {value!r}")


def _check_ratio(argument: str, value: float) -> None:
    _check(argument, value, 0.0 <= value <= 1.0, "must be between 0 and 1")


def _schedule(optimizer, factor_at, unit: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose multiplier at step ``s`` is ``factor_at(x)`` with ``x = s * unit``, the
    budget used before step ``s`` (steps, or tokens)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor_at(step * unit))


def _warmup_factor(x: int, warmup: int, unit: int) -> float:
    # (x + unit) / (warmup + unit): never 0, so the first step learns; in steps, (s + 1) / (w + 1)
    return (x + unit) / (warmup + unit)


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int,
    total: int,
    min_lr_ratio: float = 0.1,
    budget_unit: BudgetUnit = "steps",
    tokens_per_step: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay, as a multiplier of each group's base lr.

    Budgets (``warmup``, ``total``) count optimizer steps, or tokens with ``budget_unit="tokens"``
    (the trainer then passes ``tokens_per_step``, its global batch x seq_len; step ``s`` is at
    token ``s * tokens_per_step``). In steps: step ``s < warmup`` gives ``(s + 1) / (warmup + 1)``
    (never 0, so step 0 learns); from ``warmup`` to ``total`` the multiplier falls as a cosine from
    1 to ``min_lr_ratio``, and stays there after. A warmup longer than ``total`` (a short test
    run) simply never reaches the decay.
    """
    unit = _unit(budget_unit, tokens_per_step)
    _check("warmup", warmup, warmup >= 0, "must be 0 or more")
    _check("total", total, total >= 0, "must be 0 or more")
    _check_ratio("min_lr_ratio", min_lr_ratio)

    def factor(x: int) -> float:
        if x < warmup:
            return _warmup_factor(x, warmup, unit)
        if x >= total:
            return min_lr_ratio
        progress = (x - warmup) / (total - warmup)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return _schedule(optimizer, factor, unit)


def constant(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int = 0,
    budget_unit: BudgetUnit = "steps",
    tokens_per_step: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr after an optional linear warmup (same warmup rule and budgets as
    :func:`warmup_cosine`)."""
    unit = _unit(budget_unit, tokens_per_step)
    _check("warmup", warmup, warmup >= 0, "must be 0 or more")

    def factor(x: int) -> float:
        return _warmup_factor(x, warmup, unit) if x < warmup else 1.0

    return _schedule(optimizer, factor, unit)


def _decay_shape(argument: str, shape: str):
    """The fall from 1 to 0 over progress ``q`` in [0, 1] of a decay shape."""
    shapes = {
        "linear": lambda q: 1.0 - q,
        "1-sqrt": lambda q: 1.0 - math.sqrt(q),
        "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    }
    if shape not in shapes:
        raise ScheduleError(argument, f"expected one of {', '.join(shapes)}, got {shape!r}")
    return shapes[shape]


def warmup_stable_decay(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int,
    total: int,
    decay_fraction: float = 0.2,
    decay_shape: DecayShape = "1-sqrt",
    min_lr_ratio: float = 0.0,
    budget_unit: BudgetUnit = "steps",
    tokens_per_step: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup-stable-decay (WSD; Hu et al. 2024, "MiniCPM", arXiv:2404.06395): linear warmup,
    then the full lr, then a decay to ``min_lr_ratio`` over the last ``decay_fraction`` of
    ``total``.

    The decay starts at ``d = total - decay_fraction * total``, or at the end of the warmup if
    that is later, and has the shape ``linear`` (``1 - q``), ``1-sqrt`` (``1 - sqrt(q)``, which
    Hägele et al. 2024, arXiv:2405.18392, found best) or ``cosine``, over progress ``q`` from 0
    to 1: the multiplier is ``min_lr_ratio + (1 - min_lr_ratio) * shape(q)``. After ``total`` it
    stays at ``min_lr_ratio``. Budgets and warmup as in :func:`warmup_cosine`.
    """
    unit = _unit(budget_unit, tokens_per_step)
    _check("warmup", warmup, warmup >= 0, "must be 0 or more")
    _check("total", total, total > 0, "must be positive")
    _check("decay_fraction", decay_fraction, 0.0 < decay_fraction <= 1.0, "must be in (0, 1]")
    _check_ratio("min_lr_ratio", min_lr_ratio)
    shape = _decay_shape("decay_shape", decay_shape)
    decay_start = max(total - decay_fraction * total, warmup)

    def factor(x: int) -> float:
        if x < warmup:
            return _warmup_factor(x, warmup, unit)
        if x < decay_start:
            return 1.0
        if x >= total:
            return min_lr_ratio
        q = (x - decay_start) / (total - decay_start)  # x < total here, so decay_start < total
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape(q)

    return _schedule(optimizer, factor, unit)


def infinite_lr(
    optimizer: torch.optim.Optimizer,
    *,
    warmup: int,
    cooldown: int,
    constant_ratio: float = 0.25,
    anneal: int = 0,
    total: int | None = None,
    min_lr_ratio: float = 0.0,
    budget_unit: BudgetUnit = "steps",
    tokens_per_step: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """An infinite learning-rate schedule (Ibrahim et al. 2024, "Simple and Scalable Strategies to
    Continually Pre-train Large Language Models", arXiv:2403.08763, section 7.2): it needs no
    total budget until one decides to stop.

    Phases, in the budget's unit (steps, or tokens as in :func:`warmup_cosine`):

    - warmup ``[0, warmup)``: linear, as in :func:`warmup_cosine`;
    - cooldown ``[warmup, warmup + cooldown)``: from 1 down to ``constant_ratio`` with the
      inverse-square-root shape the paper uses, normalised to land on the constant exactly:
      ``c + (1 - c) * (1 / sqrt(1 + 8q) - 1/3) / (2/3)`` at progress ``q``;
    - constant ``constant_ratio`` after that, for as long as training goes on;
    - with ``anneal > 0``, a final annealing over ``[total - anneal, total)`` (starting no earlier
      than the end of the cooldown, so a short run cuts it short): an exponential
      decay from ``constant_ratio`` to ``min_lr_ratio`` (``c * (m / c) ** q``; linear,
      ``c * (1 - q)``, when ``min_lr_ratio`` is 0), then ``min_lr_ratio``. ``total`` is needed
      only then.
    """
    unit = _unit(budget_unit, tokens_per_step)
    _check("warmup", warmup, warmup >= 0, "must be 0 or more")
    _check("cooldown", cooldown, cooldown >= 0, "must be 0 or more")
    _check("anneal", anneal, anneal >= 0, "must be 0 or more")
    _check("constant_ratio", constant_ratio, 0.0 < constant_ratio <= 1.0, "must be in (0, 1]")
    _check(
        "min_lr_ratio",
        min_lr_ratio,
        0.0 <= min_lr_ratio <= constant_ratio,
        f"must be between 0 and constant_ratio ({constant_ratio})",
    )
    anneal_start = None
    if anneal:
        _check("total", total, total is not None, "annealing needs the total budget")
        _check("total", total, total >= 0, "must be 0 or more")
        anneal_start = max(total - anneal, warmup + cooldown)

    def factor(x: int) -> float:
        if x < warmup:
            return _warmup_factor(x, warmup, unit)
        if x < warmup + cooldown:
            q = (x - warmup) / cooldown
            fall = (1.0 / math.sqrt(1.0 + 8.0 * q) - 1.0 / 3.0) / (2.0 / 3.0)
            return constant_ratio + (1.0 - constant_ratio) * fall
        if anneal_start is None or x < anneal_start:
            return constant_ratio
        if x >= total:
            return min_lr_ratio
        q = (x - anneal_start) / (total - anneal_start)
        if min_lr_ratio == 0.0:
            return constant_ratio * (1.0 - q)  # an exponential cannot reach 0: linear instead
        return constant_ratio * (min_lr_ratio / constant_ratio) ** q

    return _schedule(optimizer, factor, unit)


class AuxLoss:
    """The model's auxiliary loss over a training step, when the model has one (an ``aux_loss()``
    method, of the model protocol, that gives a tensor for its last forward; None: nothing to add).

    ``aux_loss()`` right after a micro-batch's forward gives that forward's term divided by
    FORWARDS (the micro-batches a rank runs in a step), to add to the micro-batch's loss before
    its backward: the trainers average gradients over the data-parallel ranks, so the step's
    gradient is that of the mean of the aux terms of every forward of every rank (see the module
    docstring). ``pop()`` gives this rank's sum of those shares since the last ``pop()`` (the mean
    of its forwards' terms; the trainer averages it over the ranks for the metrics), or None when
    nothing was added.
    """

    def __init__(self, model: torch.nn.Module, forwards: int):
        # by the protocol: a method of the model's class (a submodule named aux_loss is not one)
        self.model = model if has_method(model, "aux_loss") else None
        self.forwards = forwards
        self.total: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor | None:
        """The last forward's aux term over FORWARDS (fp32, with its graph), or None."""
        if self.model is None:
            return None
        aux = self.model.aux_loss()
        if aux is None:
            return None
        share = aux.float() / self.forwards
        self.total = share.detach() if self.total is None else self.total + share.detach()
        return share

    def pop(self) -> torch.Tensor | None:
        """The shares added since the last call, summed (no graph); None when there were none."""
        total, self.total = self.total, None
        return total


# the dtype torch.autocast computes in, for each mixed precision
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def check_kernel_devices(kernels: dict, device: torch.device) -> None:
    """The Triton kernels the plan chose (KERNELS: train.py's ``PLAN["kernels"]``, name →
    ``{"impl", "reason"}``) can run on DEVICE (CUDA, or Triton's interpreter); a RunError saying
    how to rebuild without them otherwise. Nothing to check when the plan runs none."""
    from .errors import RunError
    from .kernels._impl import check_impl_devices

    chosen = sorted(name for name, choice in kernels.items() if choice["impl"] in ("triton", "mixed"))
    if not chosen:
        return
    try:
        check_impl_devices("triton", {device.type})
    except ValueError as exc:
        raise RunError(
            f"the package's Triton kernels ({', '.join(chosen)}; rebuild with -D kernel_impl=auto and -D loss_impl=auto "
            f"to run the torch code): {exc}"
        ) from None


def autocast(precision: str, device: torch.device):
    """The context a forward runs in: ``torch.autocast`` in the dtype of a mixed PRECISION
    (``bf16-mixed``, ``fp16-mixed``), nothing for the others (``fp32``, ``bf16``: the weights'
    dtype is the compute dtype)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


# Dense (no sparsity) peak FLOP/s by device name and the dtype of the matmuls. A key matches a
# name (torch.cuda.get_device_name()) that contains it as whole words ("A10" matches
# "NVIDIA A10" but not "NVIDIA A10G" or "NVIDIA A100-SXM4-80GB"); the first match wins, so
# specific names come first.
# tf32 is what fp32 matmuls use when torch.backends.cuda.matmul.allow_tf32 is on.
# Sources, vendor datasheets: NVIDIA H100 Tensor Core GPU datasheet (SXM, NVL and PCIe columns),
# H200 datasheet (SXM and NVL), A100 datasheet (SXM and PCIe alike), L40S and L40 datasheets, L4 datasheet,
# A10 datasheet, and the Ada (RTX 4090: fp16/bf16 with fp32 accumulate) and Ampere GA102
# (RTX 3090) architecture whitepapers. Values are the "with sparsity" figures halved.
PEAK_FLOPS = {
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},  # SXM
    "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},  # SXM
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
}

# the matmul dtype of each precision mode of the trainer
PRECISION_DTYPE = {"fp32": "fp32", "bf16-mixed": "bf16", "bf16": "bf16", "fp16-mixed": "fp16"}


def device_name(device: torch.device) -> str:
    """The device's marketing name (``torch.cuda.get_device_name``), or ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of device ``name`` for ``dtype`` (``bf16``, ``fp16``, ``tf32``,
    ``fp32``) from :data:`PEAK_FLOPS`, or None when the device is not in the table."""
    if dtype not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"unknown dtype {dtype!r}")
    for key, peaks in PEAK_FLOPS.items():
        if re.search(rf"(?<!\w){re.escape(key)}(?!\w)", name):
            return peaks[dtype]
    return None


def matmul_dtype(precision: str, device: torch.device) -> str:
    """The dtype a run's matmuls use: bf16 for the bf16 modes; for fp32, tf32 when CUDA allows it."""
    dtype = PRECISION_DTYPE[precision]
    if dtype == "fp32" and torch.device(device).type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return dtype


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one device: ``flops_per_token * tokens_per_s / peak``, or None
    when the peak is unknown (never a guess).

    ``tokens_per_s`` is this device's rate (divide a global rate by the world size first).
    """
    if peak is None or not flops_per_token:
        return None
    return flops_per_token * tokens_per_s / peak


class MFU:
    """Model FLOPs utilisation of a run: the FLOPs of one token over the peak of the device for
    the run's matmul dtype (:data:`PEAK_FLOPS`); None, never a guess, when either is unknown.

    The FLOPs of one token are the model's own count, ``model.flops_per_token(seq_len)`` (the
    component library's ``CausalLM``: ``6N + 12*L*H*T`` over the parameters in matmuls, as
    ``fgc explain`` prints it); for a model without that method, :func:`model_flops_per_token`
    over all its parameters when it says ``num_hidden_layers`` and ``hidden_size``."""

    def __init__(self, model: torch.nn.Module, seq_len: int, precision: str, device: torch.device):
        layers = getattr(model, "num_hidden_layers", None)
        hidden = getattr(model, "hidden_size", None)
        self.facts = None
        self.flops_per_token = None
        self.formula = None
        if callable(getattr(type(model), "flops_per_token", None)):  # a method, not an attribute
            self.flops_per_token, self.formula = model.flops_per_token(seq_len)
        elif layers is not None and hidden is not None:
            n = sum(p.numel() for p in model.parameters())
            self.facts = {"N": n, "L": layers, "H": hidden, "T": seq_len}
            self.flops_per_token = model_flops_per_token(n, layers, hidden, seq_len)
            f = self.facts
            self.formula = (
                f"6N + 12*L*H*T = 6*{f['N']:,} + 12*{f['L']}*{f['H']}*{f['T']}"
                f" = {self.flops_per_token:,.0f}"
            )
        self.device_name = device_name(device)
        self.dtype = matmul_dtype(precision, device)
        self.peak = peak_flops(self.device_name, self.dtype)

    def __call__(self, tokens_per_s_per_device: float) -> float | None:
        """The MFU at this rate of one device, or None."""
        return mfu(self.flops_per_token, tokens_per_s_per_device, self.peak)

    def describe(self) -> str:
        """The line a trainer prints once at start: the formula with its numbers, and the peak used
        (or why MFU is null)."""
        if self.flops_per_token is None:
            return (
                "MFU: the model has no flops_per_token(seq_len) and does not say num_hidden_layers "
                "and hidden_size, reported as null"
            )
        formula = f"FLOPs/token = {self.formula}"
        if self.peak is None:
            return f"{formula}; MFU: unknown device {self.device_name} ({self.dtype}), reported as null"
        return (
            f"{formula}; MFU = FLOPs/token * tokens/s per device / peak, "
            f"peak {self.peak / 1e12:g} TFLOP/s ({self.device_name}, dense {self.dtype})"
        )
