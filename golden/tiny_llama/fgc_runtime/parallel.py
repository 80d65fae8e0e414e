"""Applying the plan's parallelism to a model: activation checkpointing and compilation, per
decoder layer, in the order the plan gives (tensor parallel, activation checkpointing, compile,
FSDP2; this version has the middle two).

A decoder layer is a child of an ``nn.ModuleList`` attribute named ``layers`` (as in the component
library and transformers' models). Both functions change modules in place and keep every
parameter name, so checkpoints and state dicts are the same with or without them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import RunError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of MODEL, in order (a RunError when it has none)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList):
            return list(module)
    raise RunError("the model has no `layers` ModuleList: cannot apply per-layer settings")


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder layer's activations in the backward instead of keeping them.

    Only the layer's inputs are kept (non-reentrant ``torch.utils.checkpoint``). Returns the
    number of layers wrapped.
    """
    layers = decoder_layers(model)
    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # eval: nothing to save, nothing to recompute
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    return len(layers)


def apply_compile(model: nn.Module, mode: str | None = None, fullgraph: bool = False) -> int:
    """``torch.compile`` each decoder layer in place (its parameter names do not change).
    Returns the number of layers compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=mode, fullgraph=fullgraph)
    return len(layers)
