"""Applying the plan's parallelism to a model, per decoder layer, in the order the plan gives:
tensor parallel, activation checkpointing, compile, FSDP2.

The model says which modules are its decoder layers (``model.decoder_layers()``, as the component
library's ``CausalLM`` does), and each part of a layer says how tensor parallelism splits it (its
``tp_plan``). These functions change modules in place and keep every parameter name; with FSDP2,
checkpoints hold the full (gathered) state dicts, so they are the same with or without any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import ModelState, does_not_fit
from .errors import RunError


def has_method(obj, name: str) -> bool:
    """Whether OBJ's class defines a method NAME (a submodule or attribute of that name does not
    count: ``self.embed = nn.Embedding(...)`` is callable, but not the protocol's ``embed``)."""
    return callable(getattr(type(obj), name, None))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of MODEL, in order, as its ``decoder_layers()`` gives them (a RunError
    when it has no such method)."""
    if not has_method(model, "decoder_layers"):
        raise RunError(
            f"the model ({type(model).__name__}) has no decoder_layers() method: cannot apply "
            "per-layer settings (activation checkpointing, compile, FSDP2, tensor parallelism)"
        )
    return list(model.decoder_layers())


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


def layer_tp_plan(layer: nn.Module) -> dict[str, str]:
    """The tensor-parallel plan of a decoder layer: each Linear a part of LAYER names in its
    ``tp_plan`` (child name -> ``"colwise"`` or ``"rowwise"``), by its dotted name in LAYER.
    Parts that declare no plan stay whole on every rank."""
    plan = {}
    for name, module in layer.named_modules():
        for child, style in getattr(module, "tp_plan", {}).items():
            plan[f"{name}.{child}" if name else child] = style
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> int:
    """Split each decoder layer's projections over TP_MESH as its parts' ``tp_plan`` says:
    column-wise (by output features: the attention's q, k, v and the MLP's gate and up in the
    component library) and row-wise (by input features: o and down), so a layer needs one
    all-reduce in the forward after attention and one after the MLP. The embedding, norms and head
    stay whole on every rank. Parameter names do not change. Returns the number of projections
    split."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    count = 0
    for layer in decoder_layers(model):
        plan = layer_tp_plan(layer)
        if not plan:
            raise RunError(
                f"the decoder layer {type(layer).__name__} has no part with a tp_plan: nothing says "
                "which of its projections tensor parallelism splits"
            )
        unknown = sorted({style for style in plan.values() if style not in styles})
        if unknown:
            raise RunError(
                f"unknown tensor-parallel style(s) {', '.join(map(repr, unknown))} in a tp_plan of "
                f"{type(layer).__name__}: expected colwise or rowwise"
            )
        parallelize_module(layer, tp_mesh, {name: styles[style]() for name, style in plan.items()})
        count += len(plan)
    return count


def clip_sharded_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Clip the gradients of a model sharded over several meshes (FSDP2 on "dp_shard", tensor
    parallel on "dp_shard" x "tp") to total norm MAX_NORM; returns the total norm before clipping.

    A gradient's squared local norm is summed over the mesh dimensions it is sharded on (not over
    those it is replicated on), so every element counts once and every rank gets the same norm."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    total = sharded_squared_norm([p.grad for p in params]).sqrt()
    by_mesh: dict = {}  # mesh (None: plain tensors) -> the parameters whose gradients it holds
    for p in params:
        by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    for mesh_params in by_mesh.values():  # a foreach op takes the tensors of one mesh only
        # (torch's function takes the parameters, and scales their .grad)
        torch.nn.utils.clip_grads_with_norm_(mesh_params, max_norm, total)
    return total.item()


def sharded_squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The squared L2 norm of GRADS, some of which may be DTensors sharded over device meshes: a
    shard's squared norm is summed over the mesh dimensions it is sharded on (not over those it is
    replicated on), so every element counts once and every rank of those meshes gets the same
    value. Plain tensors count as they are (every rank holds them whole)."""
    from torch.distributed.tensor import DTensor, Replicate

    sums: dict = {}  # (mesh, sharded mesh dims) -> squared norm of the local shards
    for grad in grads:
        if isinstance(grad, DTensor):
            key = (grad.device_mesh, tuple(d for d, p in enumerate(grad.placements) if not isinstance(p, Replicate)))
            local = grad.to_local()
        else:
            key, local = (None, ()), grad
        sums[key] = sums.get(key, 0.0) + torch.linalg.vector_norm(local, dtype=torch.float32) ** 2
    device = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device if grads else None
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for (mesh, dims), value in sums.items():
        value = torch.as_tensor(value, dtype=torch.float32, device=total_sq.device).clone()
        for d in dims:
            torch.distributed.all_reduce(value, group=mesh.get_group(d))
        total_sq += value
    return total_sq


def split_groups_by_mesh(groups: list[dict]) -> list[dict]:
    """Split optimizer parameter groups so that each holds parameters of one device mesh (the
    optimizer's foreach ops take the tensors of one mesh only): a group's tensor-parallel
    parameters move to a group of the same settings, named with a " (tensor parallel)" suffix."""
    from torch.distributed.tensor import DTensor

    def on_tp(entry) -> bool:
        param = entry[1] if isinstance(entry, tuple) else entry
        return isinstance(param, DTensor) and "tp" in (param.device_mesh.mesh_dim_names or ())

    out = []
    for group in groups:
        rest = [e for e in group["params"] if not on_tp(e)]
        tp = [e for e in group["params"] if on_tp(e)]
        # both groups, even when one is empty: every rank gets the same groups (a pipeline rank's
        # stages may hold no parameter of one kind), so the lr schedule's state fits every rank
        name = group.get("name", len(out))
        out.append({**group, "params": rest})
        out.append({**group, "name": f"{name} (tensor parallel)", "params": tp})
    return out


def apply_fsdp(
    model: nn.Module, device: torch.device, reshard_after_forward: bool = True, mesh=None, root: nn.Module | None = None
) -> int:
    """Shard MODEL with FSDP2 over MESH (default: every rank): each decoder layer is one unit, the
    root (embedding, final norm, head) another. ROOT (default MODEL) is the module made FSDP2's
    root: a module holding MODEL whose forward runs more than MODEL's (fgc_runtime's LMHeadLoss,
    which computes the head outside MODEL's forward), so that the root's parameters stay gathered
    for all of it and their gradients are reduced after its backward. MODEL's parameters keep
    their names either way. Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model if root is None else root, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return len(layers) + 1


@dataclass(frozen=True)
class Step:
    """One step a plan's ``apply_order`` may name: what :func:`parallelize` calls for it,
    ``apply(model, dist, mesh, **options)``, and the options it reads (keyword arguments of
    :func:`parallelize`; fgc's code generator passes each as the train.py constant of its name in
    upper case, and ``root`` as the module FSDP2 makes its root). A step without ``apply`` is a
    pipeline's, which train.py takes after :func:`parallelize`
    (``fgc_runtime.pipeline.parallelize_stages``): building the rank's stages from the whole
    model, then sharding each."""

    apply: Callable | None
    options: tuple[str, ...] = ()


def _tensor_parallel(model: nn.Module, dist, mesh) -> None:
    apply_tensor_parallel(model, mesh.tp)


def _activation_checkpointing(model: nn.Module, dist, mesh, activation_checkpointing: str, every_n_layers: int) -> None:
    apply_activation_checkpointing(model, mode=activation_checkpointing, every_n_layers=every_n_layers)


def _compile(model: nn.Module, dist, mesh, compile_mode: str | None, compile_fullgraph: bool) -> None:
    apply_compile(model, mode=compile_mode, fullgraph=compile_fullgraph)


def _fsdp(model: nn.Module, dist, mesh, reshard_after_forward: bool, root: nn.Module) -> None:
    """FSDP2 over MESH's ``fsdp`` sub-mesh; without a mesh over every rank (and nothing to shard
    in one process)."""
    if mesh is not None:
        apply_fsdp(model, dist.device, reshard_after_forward=reshard_after_forward, mesh=mesh.fsdp, root=root)
    elif dist.distributed:
        apply_fsdp(model, dist.device, reshard_after_forward=reshard_after_forward, root=root)


# The steps, by the names a plan's apply_order uses (the plan-training pass orders them). A new
# way of changing the model is one entry here and its name in that pass.
STEPS: dict[str, Step] = {
    "tensor parallel": Step(_tensor_parallel),
    "activation checkpointing": Step(_activation_checkpointing, ("activation_checkpointing", "every_n_layers")),
    "compile": Step(_compile, ("compile_mode", "compile_fullgraph")),
    "fsdp2": Step(_fsdp, ("reshard_after_forward", "root")),
    "pipeline stages": Step(None),
    "fsdp2 per stage": Step(None),
}


def parallelize(model: nn.Module, plan: dict, dist, mesh=None, *, weights=None, tensor_rules=(), **options) -> None:
    """Apply the steps of PLAN's ``apply_order`` to MODEL in place, in that order (see
    :data:`STEPS`): tensor parallelism over MESH's ``tp``, activation checkpointing, compilation,
    FSDP2 (over MESH's ``fsdp`` sub-mesh, else every rank). OPTIONS are the settings the steps
    read; one a step needs and does not get is a KeyError (a package its runtime does not fit).

    A MODEL built on the meta device and not cut into pipeline stages (which materialise their
    own share) is then allocated on the run's device, each rank only its shards, and given the
    values of the whole model by its ``init_weights()``; WEIGHTS, a Hugging Face model directory,
    then gives each rank its shards of the pretrained weights (TENSOR_RULES: the family's name
    rules, as :func:`fgc_runtime.hf.load_weights` takes them)."""
    for name in plan["apply_order"]:
        step = STEPS[name]
        if step.apply is not None:
            step.apply(model, dist, mesh, **{key: options[key] for key in step.options})
    if plan["pipeline"] is None and any(p.is_meta for p in model.parameters()):
        model.to_empty(device=dist.device)
        model.init_weights()
        if weights is not None:
            from .hf import load_weights

            load_weights(model, weights, tensor_rules)


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


class ShardedState(ModelState):
    """What a checkpoint holds of a model sharded by FSDP2 or tensor parallelism: the full
    (gathered) state dicts, so the checkpoint loads into any layout; every rank takes part in
    gathering them, and restores its own shards from them."""

    # how this layout restores its share from full state dicts (a pipeline's own: fgc_runtime.pipeline)
    restore = staticmethod(load_full_state_dicts)

    def state_dicts(self, tokens_seen: int) -> tuple:
        return (*full_state_dicts(self.model, self.optimizer), None)

    def load(self, state: dict, path) -> int:
        try:
            self.restore(self.model, self.optimizer, state["model"], state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:  # a different model shape
            raise does_not_fit(err, path) from None
        return state["trainer_state"]["tokens_seen"]
