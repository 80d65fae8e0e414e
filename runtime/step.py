"""How one training step is shared over the ranks, chosen once from the program's plan.

A step reads a batch, counts its target tokens, runs the forward and backward of each
micro-batch, and measures (and clips) the gradient norm; the ranks then agree on its loss. What
each of these means over the ranks depends on the mesh: which ranks read different batches,
who averages the gradients (DDP, FSDP2, an explicit average, nobody), and how the gradients
are sharded. :func:`step_sync` reads that from the plan and returns a :class:`StepSync`, whose
methods the generated loop calls in the same order for every trainer:

    sync.count(n_targets)                    # the step's global target count, in place
    with sync.micro_batch(last):             # each micro-batch's forward and backward,
        forward_backward(..., sync.grad_scale)   # its loss scaled by grad_scale / n_targets
    sync.after_backward()
    norm = sync.clip_grad_norm(max_norm)
    sync.loss_sum(step_loss_sum)             # the step's loss sum over the ranks, in place
    totals = sync.totals(step_loss_sum, n_targets, tokens_seen, norm)   # what is logged and checked
    ...                                      # the optimizer step
    sync.end_step(last)                      # DiLoCo's outer step, when its round is complete

With DiLoCo (``fgc_runtime.diloco``, the ``outer`` loop of a StepSync), a worker's ranks are "the
ranks" above; :meth:`StepSync.totals` and :meth:`StepSync.aux_mean` then sum over every worker,
:meth:`StepSync.end_step` runs the outer step and :meth:`StepSync.eval_weights` puts the global
parameters in the model for evaluation and samples. :meth:`StepSync.train_state` gives what a
checkpoint holds. A pipeline runs its schedule as the loop's one micro-batch
(:class:`fgc_runtime.pipeline.Pipeline`), and :func:`fgc_runtime.pipeline.pipeline_sync` gives a
:class:`fgc_runtime.pipeline.PipelineSync`, with the same methods around it.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

from . import distributed
from .checkpoint import ModelState
from .mesh import average_grads
from .parallel import ShardedState, clip_sharded_grad_norm_
from .train import grad_norm

WORLD = "world"  # every rank (through fgc_runtime.distributed: a no-op in one process)


class StepTotals(NamedTuple):
    """A step's numbers for its metrics record and its non-finite check: the loss sum, the count
    of target tokens, the run's tokens and the gradient norm, over the ranks that read different
    batches, or with DiLoCo over every worker (the norm then the workers' mean). Tensors where
    nothing had to be gathered (read when logged), floats otherwise."""

    loss_sum: Any
    count: Any
    tokens: int
    norm: Any

    @property
    def loss(self) -> float:
        """The step's loss: the summed token loss over the target count."""
        return float(self.loss_sum / self.count)


class OuterLoop:
    """What a step sync does about DiLoCo's outer loop (``outer``: a
    :class:`fgc_runtime.diloco.DiLoCo`, or None): the step's totals over every worker, the outer
    step at a step's end, the global parameters for evaluation. :class:`StepSync` and
    :class:`fgc_runtime.pipeline.PipelineSync` share it."""

    outer = None

    def totals(self, loss_sum: torch.Tensor, count: torch.Tensor, tokens: int, norm) -> StepTotals:
        """The step's :class:`StepTotals` from its LOSS_SUM and target COUNT (over the ranks
        already), this rank's TOKENS and the gradient NORM. With DiLoCo, over every worker: one
        small all-reduce a step, although nothing else is synced between rounds."""
        if self.outer is None:
            return StepTotals(loss_sum, count, tokens, norm)
        loss_sum, count, tokens, norm = self.outer.global_sum([loss_sum.item(), count.item(), tokens, norm])
        return StepTotals(loss_sum, count, int(tokens), norm / self.outer.workers)

    def end_step(self, last: bool) -> None:
        """After the optimizer step. With DiLoCo, count an inner step and, every
        ``inner_steps`` steps and at the LAST step (so the final model is the global one),
        average the workers' pseudo-gradients and take the outer step."""
        if self.outer is not None:
            self.outer.step(last=last)

    def eval_weights(self):
        """The context for evaluation and samples: the model as it is, or with DiLoCo the
        global parameters as of the last sync (this worker's own are put back on the way out)."""
        return self.outer.global_model() if self.outer is not None else contextlib.nullcontext()


class StepSync(OuterLoop):
    """The sharing of a step over a group of ranks (:func:`step_sync` picks one).

    - ``group``: the ranks that read different batches, over which targets and losses are
      summed: :data:`WORLD`, a process group, or None (one rank alone);
    - ``grad_scale``: over how many ranks the gradient sync averages (1: none), so that a
      micro-batch's loss ``loss_sum * grad_scale / n_targets`` makes that average the sum over
      the ranks divided by the global target count;
    - ``grads``: who syncs gradients: ``ddp`` (a DistributedDataParallel ``train_model``,
      synced on the last micro-batch only), ``fsdp`` (FSDP2's ``fsdp_root``, likewise),
      ``average`` (an explicit mean over ``group`` after the backward, DDP's semantics where
      DDP's buckets cannot take tensor-parallel shards) or None;
    - ``norm``: how the total gradient norm is gathered: ``plain`` (whole tensors), ``dtensor``
      (FSDP2's shards: the norm is itself a DTensor) or ``sharded`` (shards of several meshes,
      FSDP2's and tensor parallel's);
    - ``outer``: DiLoCo's outer loop (a :class:`fgc_runtime.diloco.DiLoCo`) around the step, or
      None.
    """

    def __init__(
        self, dist, *, group, grad_scale: int, grads: str | None, norm: str, model, fsdp_root=None, outer=None
    ):
        self.dist = dist
        self.outer = outer
        self.group = group
        self.grad_scale = grad_scale
        self.grads = grads
        self.norm = norm
        self.model = model
        self.fsdp_root = fsdp_root
        self.train_model = None  # what wrap() returns

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the loop runs: MODULE (the model, or what wraps it: the loss head, document
        masking), in DistributedDataParallel over ``group`` when DDP syncs the gradients."""
        self.train_model = module
        if self.grads == "ddp" and self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            group = None if self.group is WORLD else self.group  # None: every rank
            self.train_model = DistributedDataParallel(module, process_group=group)
        return self.train_model

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is WORLD:
            distributed.all_reduce_sum(t, self.dist)
        elif self.group is not None:
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def count(self, n_targets: torch.Tensor) -> torch.Tensor:
        """The step's target count summed over the ranks that read different batches (in
        place); the count is known before the first backward."""
        return self._sum(n_targets)

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: the gradients are synced on
        the LAST micro-batch of the step only."""
        if self.grads == "ddp" and not last and self.dist.distributed:
            return self.train_model.no_sync()
        if self.grads == "fsdp" and self.dist.distributed:
            self.fsdp_root.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def after_backward(self) -> None:
        """Once every micro-batch is done: the explicit mean of the gradients, where no wrapper
        takes it."""
        if self.grads == "average":
            average_grads(self.model, self.group)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """The total norm of the model's gradients, after clipping them to MAX_NORM (None:
        measured, not clipped); the same on every rank."""
        if self.norm == "sharded":
            return clip_sharded_grad_norm_(self.model, max_norm if max_norm is not None else float("inf"))
        if self.norm == "dtensor":
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm is not None else float("inf"))
            return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if max_norm is None:
            return grad_norm(self.model.parameters())
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()

    def loss_sum(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The step's loss sum over the ranks (in place), on every rank."""
        return self._sum(loss_sum)

    def aux_mean(self, aux: torch.Tensor) -> float:
        """The mean over the ranks of each rank's auxiliary loss (a float); with DiLoCo, over
        every rank of every worker (a collective)."""
        if self.outer is not None:
            return self.outer.global_sum([aux.item()])[0] / self.outer.workers
        return self._sum(aux).item() / self.grad_scale

    def train_state(self, optimizer: torch.optim.Optimizer) -> ModelState:
        """What a checkpoint holds of the model and OPTIMIZER: DiLoCo's global and per-worker
        state; the full state dicts gathered from FSDP2's or tensor parallelism's shards; or the
        state dicts of a model every rank holds whole."""
        if self.outer is not None:
            return self.outer.train_state(self.model, optimizer)
        if self.grads == "fsdp" or self.norm == "sharded":
            return ShardedState(self.model, optimizer)
        return ModelState(self.model, optimizer)


def sync_kind(plan: dict) -> tuple[str | None, str | None, str]:
    """What a plan's step sync is, as data: ``(group, grads, norm)``, GROUP naming the ranks
    that read different batches (``world``, ``dp``: the data-parallel groups, ``worker``: a
    DiLoCo worker's ranks, None: one rank alone), GRADS and NORM as in :class:`StepSync`. The
    one decision :func:`step_sync` and fgc's description of it (train.py's comment) share."""
    trainer = plan["trainer_type"]
    if trainer == "pipeline":
        raise ValueError("the pipeline trainer runs its schedule, not a StepSync")
    tensor = bool(plan.get("tensor_parallel"))
    if trainer == "diloco":
        # no sync between workers; within a worker of several data-parallel ranks, DDP or FSDP2
        # over them (with tensor parallelism, an explicit mean: DDP's buckets cannot take the
        # tensor-parallel shards; the ranks of one tensor-parallel group read the same batch)
        inner = plan["diloco"]["inner"]
        norm = "sharded" if tensor else ("dtensor" if inner == "fsdp2" else "plain")
        if inner == "none":
            return None, None, norm
        return "worker", "fsdp" if inner == "fsdp2" else ("average" if tensor else "ddp"), norm
    if tensor:
        # the ranks of a tensor-parallel group read the same batch: sums over the groups
        return "dp", "fsdp" if trainer == "fsdp2" else "average", "sharded"
    if trainer == "fsdp2":
        return WORLD, "fsdp", "dtensor"
    return WORLD, "ddp" if trainer == "ddp" else None, "plain"


def step_sync(plan: dict, dist, mesh=None, *, model, fsdp_root=None, outer=None) -> StepSync:
    """The :class:`StepSync` of a plan (``PLAN`` of the generated train.py) for every trainer
    but the pipeline's (:func:`sync_kind`): MODEL is the model (its parameters), FSDP_ROOT
    FSDP2's root module (the model, or the loss head wrapping it), MESH the runtime's
    :class:`~fgc_runtime.mesh.Mesh` where the plan has one, OUTER the DiLoCo outer loop of a
    DiLoCo plan. Its :meth:`StepSync.wrap` then gives what the loop runs."""
    if (outer is not None) != (plan["trainer_type"] == "diloco"):
        raise ValueError("a DiLoCo plan's step sync needs its outer loop, and only a DiLoCo plan's")
    group, grads, norm = sync_kind(plan)
    if group == "dp":
        group, scale = mesh.dp_group, mesh.dp_size
    elif group == "worker":
        group, scale = mesh.worker_group, plan["diloco"]["data_ranks_per_worker"]
    else:  # every rank, or one rank alone
        scale = dist.world_size if group == WORLD else 1
    return StepSync(
        dist, group=group, grad_scale=scale, grads=grads, norm=norm, model=model, fsdp_root=fsdp_root, outer=outer
    )
