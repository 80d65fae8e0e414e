"""Applying the plan's parallelism to a model, per decoder layer, in the order the plan gives:
(tensor parallel,) activation checkpointing, compile, FSDP2 -- this version has the last three.

A decoder layer is a child of an ``nn.ModuleList`` attribute named ``layers`` (as in the component
library and transformers' models). Both functions change modules in place and keep every
parameter name; with FSDP2, checkpoints hold the full (gathered) state dicts, so they are the same
with or without any of them.
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


# Under selective checkpointing these ops' outputs are kept (they are the expensive ones); every
# other op in a checkpointed layer is recomputed in the backward.
_SAVED_OPS = tuple(
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every_n_layers: int = 1) -> int:
    """Checkpoint decoder layers 0, n, 2n, ... (n = EVERY_N_LAYERS; non-reentrant
    ``torch.utils.checkpoint``): ``full`` keeps only each such layer's inputs; ``selective`` also
    keeps the outputs of its matmuls and attention and recomputes only the element-wise ops.
    Returns the number of layers wrapped."""
    if mode not in ("full", "selective"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}")
    layers = decoder_layers(model)[::every_n_layers]
    extra = {"context_fn": _selective_context} if mode == "selective" else {}
    for layer in layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # eval: nothing to save, nothing to recompute
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **extra, **kwargs)

        layer.forward = checkpointed
    return len(layers)


def apply_compile(model: nn.Module, mode: str | None = None, fullgraph: bool = False) -> int:
    """``torch.compile`` each decoder layer in place (its parameter names do not change).
    Returns the number of layers compiled."""
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(mode=mode, fullgraph=fullgraph)
    return len(layers)


def apply_fsdp(model: nn.Module, device: torch.device, reshard_after_forward: bool = True) -> int:
    """Shard MODEL with FSDP2 over every rank: each decoder layer is one unit, the root (embedding,
    final norm, head) another. Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(layers) + 1


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The model's and optimizer's full (unsharded) state dicts, on the CPU of rank 0 (empty on the
    other ranks). Every rank must call this: it gathers the shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Load full state dicts (as :func:`full_state_dicts` wrote them) into a sharded model and its
    optimizer; every rank passes the full dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
