"""Pipeline parallelism: the model cut into stages that run one of torch's pipeline schedules.

The model says how it is cut (the component library's ``CausalLM`` does): ``decoder_layers()``,
the modules besides layers each stage holds (``stage_modules(first, last)``, by their full
names), and the pieces of its own forward a stage runs: ``embed``, ``layer_context``,
``run_layers`` over the stage's layers, ``final_hidden`` and ``head``. A stage is a contiguous
run of decoder layers; the first stage also holds the embedding, the last the final norm and the
head. :class:`StageModule` keeps every parameter's full name (``model.layers.3.mlp.up_proj.weight``),
so the state dicts of the stages merge into the whole model's, and checkpoints are the same with
or without pipelining.

The plan (``PLAN["pipeline"]`` in train.py, computed by fgc) gives each stage's layers and rank:
stage ``s`` of ``S`` runs on rank ``s % P`` in the loop layout (interleaved schedules) and on
rank ``s`` or ``S - 1 - s`` in the V layout (ZBV and DualPipeV: the first and last stage share
rank 0).

The loss: each micro-batch's loss function returns its summed token loss divided by the global
count of target tokens in the step (over micro-batches and data-parallel replicas), so the
schedule's gradients are those of the step loss with no further scaling (``scale_grads=False``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn

from . import distributed
from .checkpoint import ModelState
from .errors import RunError
from .parallel import ShardedState, has_method
from .step import OuterLoop
from .train import count_targets

SCHEDULE_CLASSES = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "looped-bfs": "ScheduleLoopedBFS",
    "interleaved-zero-bubble": "ScheduleInterleavedZeroBubble",
    "zbv-zero-bubble": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")


# what a model must answer to be cut into stages (the component library's CausalLM does)
PIPELINE_METHODS = ("decoder_layers", "stage_modules", "embed", "layer_context", "run_layers", "final_hidden", "head")


def check_pipelinable(model: nn.Module) -> None:
    """A RunError naming the methods MODEL lacks to be cut into pipeline stages, if any, or saying
    that it adds an auxiliary loss (which no stage could compute alone)."""
    missing = [name for name in PIPELINE_METHODS if not has_method(model, name)]
    if missing:
        raise RunError(
            f"the model ({type(model).__name__}) cannot be pipelined: it has no "
            + ", ".join(f"{name}()" for name in missing)
            + " (see fgc_runtime.pipeline)"
        )
    if has_method(model, "aux_loss") and model.aux_loss() is not None:
        # an MoE's load-balancing loss pools the routing of every layer: no stage has it all
        raise RunError(
            f"the model ({type(model).__name__}) adds an auxiliary loss (aux_loss()), which a pipeline "
            "cannot add: it pools every layer's routing, and a stage holds only some layers"
        )


def _attach(root: nn.Module, dotted: str, module: nn.Module) -> None:
    """Register MODULE in ROOT under the dotted name DOTTED, making empty parents as needed."""
    *parents, leaf = dotted.split(".")
    owner = root
    for name in parents:
        if not hasattr(owner, name):
            owner.add_module(name, nn.Module())
        owner = getattr(owner, name)
    owner.add_module(leaf, module)


class StageModule(nn.Module):
    """Decoder layers ``layers`` of MODEL, plus the modules MODEL's ``stage_modules(first, last)``
    names (the embedding on the first stage, the final norm and head on the last). Its parameters
    are MODEL's own (no copies), under their full names.

    ``forward`` takes token ids (first stage) or hidden states ``(B, T, D)`` and returns hidden
    states, or logits ``(B, T, V)`` on the last stage, through MODEL's own methods: ``embed``,
    ``layer_context``, ``run_layers`` over this stage's layers, ``final_hidden`` and ``head``.
    With ``head=False`` the last stage returns the final-normed hidden states instead, and the
    schedule's loss function applies the head (the chunked and Triton losses: fgc_runtime's
    ``LMHeadLoss.loss_from_hidden``); the head's weight is still this stage's parameter.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], first: bool, last: bool, head: bool = True):
        super().__init__()
        check_pipelinable(model)
        self.first, self.last, self.with_head = first, last, head
        self.layer_indices = list(layers)
        # the whole model, whose methods run the stage, kept out of this module's children (its
        # parameters are not all this stage's)
        self._whole = (model,)
        all_layers = model.decoder_layers()
        layers_name = next((name for name, m in model.named_modules() if m is all_layers), None)
        if layers_name is None:
            raise RunError("the model's decoder_layers() is not one of its submodules: cannot name a stage's layers")
        before = model.stage_modules(first, False)
        after = {k: m for k, m in model.stage_modules(first, last).items() if k not in before}
        self.held = [*before, *after]
        for name, module in before.items():
            _attach(self, name, module)
        _attach(self, layers_name, nn.ModuleDict({str(i): all_layers[i] for i in self.layer_indices}))
        self.stage_layers = [all_layers[i] for i in self.layer_indices]  # a list: not registered twice
        for name, module in after.items():
            _attach(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (model,) = self._whole
        B, T = x.shape[:2]
        position_ids_BT = torch.arange(T, device=x.device).unsqueeze(0).expand(B, T)
        x_BTD = model.embed(x, position_ids_BT) if self.first else x
        x_BTD = model.run_layers(x_BTD, model.layer_context(position_ids_BT), self.layer_indices)
        if self.last:
            hidden_BTD = model.final_hidden(x_BTD)
            return model.head(hidden_BTD) if self.with_head else hidden_BTD
        return x_BTD


def local_stages(plan: dict, pp_rank: int) -> list[dict]:
    """The plan's stages that run on pipeline rank PP_RANK, in stage order."""
    return [s for s in plan["stages"] if s["rank"] == pp_rank]


def build_stages(model: nn.Module, plan: dict, pp_rank: int, group, device: torch.device, head: bool = True):
    """This rank's part of MODEL and its pipeline stages.

    Returns ``(part, stages)``: ``part`` is one :class:`StageModule` holding every layer of this
    rank (its parameters, state dict and optimizer groups are this rank's share of the model's,
    under the full names); ``stages`` are the ``PipelineStage`` objects the schedule runs. The
    rest of MODEL moves to the meta device.

    A MODEL built on the meta device (train.py does so for the component library's ``CausalLM``)
    has only this rank's share materialised on DEVICE and initialised by ``model.init_weights()``,
    which gives each parameter the values the whole model would have: a rank never holds more
    than its stages.

    With ``head=False`` the last stage gives the final hidden states, not logits (see
    :class:`StageModule`): the loss function computes the head.
    """
    from torch.distributed.pipelining import PipelineStage

    check_pipelinable(model)
    num_stages = len(plan["stages"])
    mine = local_stages(plan, pp_rank)
    layers = [i for s in mine for i in range(*s["layers"])]
    part = StageModule(
        model,
        layers,
        first=any(s["stage"] == 0 for s in mine),
        last=any(s["stage"] == num_stages - 1 for s in mine),
    )
    # What this rank does not run moves to the meta device: its memory is freed, its shapes stay
    # (parameter counts, e.g. for the FLOPs per token, still see the whole model).
    if any(t.is_meta for t in part.parameters()):
        if not has_method(model, "init_weights"):
            raise RunError("the model was built on the meta device but has no init_weights() to initialise its stages")
        part.to_empty(device=device)
        model.init_weights()  # skips what stays on the meta device
    for i, layer in enumerate(model.decoder_layers()):
        if i not in layers:
            layer.to_empty(device="meta")
    for name, module in model.stage_modules(True, True).items():
        if name not in part.held:
            module.to_empty(device="meta")
    stages = []
    for s in mine:
        index = s["stage"]
        module = StageModule(model, range(*s["layers"]), first=index == 0, last=index == num_stages - 1, head=head)
        stages.append(PipelineStage(module, index, num_stages, device, group=group))
    return part, stages


def parallelize_stages(model: nn.Module, plan: dict, dist, mesh, *, head: bool = True, weights=None, tensor_rules=()):
    """The pipeline's part of a plan's parallelism, after ``fgc_runtime.parallel.parallelize``:
    this rank's ``(part, stages)`` of MODEL from PLAN's (train.py's ``PLAN``) pipeline, on MESH's
    pipeline group (:func:`build_stages`; HEAD as there); then, for a model built on the meta
    device from pretrained WEIGHTS (a Hugging Face model directory), this rank's stages' tensors
    of them (TENSOR_RULES: the family's name rules); then, when PLAN's ``apply_order`` has
    ``fsdp2 per stage``, FSDP2 over MESH's ``fsdp`` sub-mesh on each stage (:func:`shard_stages`)."""
    part, stages = build_stages(model, plan["pipeline"], mesh.pp_rank, mesh.pp_group, dist.device, head=head)
    if weights is not None:
        from .hf import load_weights

        load_weights(model, weights, tensor_rules)
    if "fsdp2 per stage" in plan["apply_order"]:
        shard_stages(stages, mesh.fsdp)
    return part, stages


def shard_stages(stages: list, mesh, reshard_after_forward: bool = True) -> int:
    """Shard each of this rank's pipeline STAGES with FSDP2 over MESH (the data-parallel replicas
    of the pipeline): each decoder layer is one unit, the stage's other modules (the embedding on
    the first, the final norm and head on the last) another. Torch's schedules drive FSDP2's
    gradient sync (reduced after a step's last micro-batch). Returns the number of units."""
    from torch.distributed.fsdp import fully_shard

    units = 0
    for stage in stages:
        for layer in stage.submod.stage_layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        # A last stage without its head (the loss function applies it) keeps its own unit gathered
        # from its forward to its backward: the loss reads the head's whole weight in between.
        keep = stage.submod.last and not stage.submod.with_head
        fully_shard(stage.submod, mesh=mesh, reshard_after_forward=reshard_after_forward and not keep)
        units += len(stage.submod.stage_layers) + 1
    return units


def build_schedule(name: str, stages: list, microbatches: int, loss_fn: Callable):
    """Torch's schedule NAME over this rank's STAGES (one stage for gpipe and 1f1b)."""
    import torch.distributed.pipelining as pipelining

    cls = getattr(pipelining, SCHEDULE_CLASSES[name])
    target = stages[0] if name in SINGLE_STAGE_SCHEDULES else stages
    return cls(target, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


# schedules whose ``eval()`` torch does not support (they split the backward): evaluation runs
# the stages one micro-batch at a time with :func:`forward_only` instead
FORWARD_ONLY_EVAL = ("zbv-zero-bubble", "dualpipev")
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send(t: torch.Tensor, peer: int, group) -> None:
    header = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape], dtype=torch.int64, device=t.device)
    torch.distributed.send(torch.tensor([header.numel()], device=t.device), group_dst=peer, group=group)
    torch.distributed.send(header, group_dst=peer, group=group)
    torch.distributed.send(t.contiguous(), group_dst=peer, group=group)


def _recv(peer: int, group, device: torch.device) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    torch.distributed.recv(size, group_src=peer, group=group)
    header = torch.zeros(int(size), dtype=torch.int64, device=device)
    torch.distributed.recv(header, group_src=peer, group=group)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    t = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=dtype, device=device)
    torch.distributed.recv(t, group_src=peer, group=group)
    return t


def forward_only(stages: list, plan: dict, pp_rank: int, group, input_ids: torch.Tensor, microbatches: int):
    """The logits of INPUT_IDS through the whole pipeline, without a schedule: each micro-batch
    goes through the stages in order, activations sent between ranks. Returns the list of each
    micro-batch's logits (the last stage's output: hidden states when it has no head) on the rank
    that holds the last stage (an empty list elsewhere)."""
    ranks = [s["rank"] for s in plan["stages"]]
    local = {stage.stage_index: stage.submod for stage in stages}
    outputs = []
    for chunk in input_ids.chunk(microbatches):
        x = chunk
        for index, rank in enumerate(ranks):
            previous = ranks[index - 1] if index else rank
            if rank == pp_rank:
                if previous != pp_rank:
                    x = _recv(previous, group, input_ids.device)
                x = local[index](x)
            elif previous == pp_rank:
                _send(x, rank, group)
        if ranks[-1] == pp_rank:
            outputs.append(x)
    return outputs


class StepLoss:
    """The schedule's loss function: a micro-batch's summed token loss over ``n_targets`` (set
    to the step's global count of target tokens before each step; 1 for plain sums).
    ``loss_sum_fn(output, labels)`` gives ``(loss_sum, count)`` from the last stage's output:
    logits, or hidden states for a head-and-loss function such as ``LMHeadLoss.loss_from_hidden``."""

    def __init__(self, loss_sum_fn: Callable):
        self.loss_sum_fn = loss_sum_fn
        self.n_targets: torch.Tensor | float = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = self.loss_sum_fn(logits, labels)
        return loss_sum / self.n_targets


class Pipeline:
    """This rank's part of a pipelined model, run through torch's schedule NAME over its STAGES
    (:func:`build_schedule`) the way train.py runs a model: :meth:`step` takes one step's
    forwards and backwards (train.py's ``forward_backward``), and calling it gives a batch's loss
    sum and target count, forward only (``evaluate``). LOSS_SUM_FN(output, labels) gives the
    ``(loss_sum, count)`` of a micro-batch from the last stage's output (:class:`StepLoss`).

    The losses are on the ranks that hold the last stage; the first rank of each of its
    tensor-parallel groups (``mesh.tp_rank`` 0) counts them in a step, and every other rank
    gives zero, so that summing over every rank counts each micro-batch once."""

    def __init__(self, part: nn.Module, stages: list, name: str, microbatches: int, loss_sum_fn: Callable, *, plan: dict, mesh):
        self.part, self.stages, self.name, self.microbatches = part, stages, name, microbatches
        self.step_loss = StepLoss(loss_sum_fn)
        self.schedule = build_schedule(name, stages, microbatches, self.step_loss)
        self.plan, self.mesh = plan, mesh

    def train(self, mode: bool = True) -> "Pipeline":
        self.part.train(mode)
        return self

    def eval(self) -> "Pipeline":
        return self.train(False)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor, n_targets) -> torch.Tensor:
        """One step's forwards and backwards: the schedule cuts the batch into its micro-batches
        and runs them through the stages, each micro-batch's loss its summed token loss over
        N_TARGETS. Returns the step's loss sum (detached) where it is counted, zero elsewhere."""
        self.step_loss.n_targets = n_targets
        losses: list[torch.Tensor] = []
        self.schedule.step(input_ids, target=labels, losses=losses)
        if losses and self.mesh.tp_rank == 0:
            return torch.stack(losses).sum().detach() * n_targets
        return torch.zeros((), device=input_ids.device)

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch's summed token loss and its count of target tokens, forward only, on the ranks
        that hold the last stage (zeros elsewhere). Torch's schedules that split the backward
        (:data:`FORWARD_ONLY_EVAL`) have no forward-only mode: there the micro-batches go through
        the stages one at a time (:func:`forward_only`), their losses computed outside autocast
        as the schedule's would be from its output."""
        self.step_loss.n_targets = 1.0  # plain sums
        if self.name in FORWARD_ONLY_EVAL:
            outputs = forward_only(self.stages, self.plan["pipeline"], self.mesh.pp_rank, self.mesh.pp_group, input_ids,
                                   self.microbatches)
            with torch.autocast(input_ids.device.type, enabled=False):
                losses = [self.step_loss(out, target) for out, target in zip(outputs, labels.chunk(self.microbatches))]
        else:
            losses = []
            self.schedule.eval(input_ids, target=labels, losses=losses)
        if not losses:
            zero = torch.zeros((), device=input_ids.device)
            return zero, zero
        return torch.stack(losses).sum(), torch.tensor(float(count_targets(labels)), device=input_ids.device)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a plain tensor as it is)."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _to_cpu(obj):
    """OBJ with every tensor whole (a DTensor gathered over its mesh: every rank of the mesh must
    call this in the same order) and on the CPU."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _names(part: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in part.named_parameters()}


def full_state_dicts(part: nn.Module, optimizer: torch.optim.Optimizer, first_copy: bool, rank: int) -> tuple:
    """The whole model's state dict and the name-keyed optimizer state, gathered from the
    pipeline ranks of the first replica (FIRST_COPY: the first rank of its tensor-parallel group
    in the first data-parallel copy) onto rank 0 (None elsewhere). Every rank must call it: the
    shards of tensor-parallel and FSDP2 parameters are gathered first."""
    whole = (_to_cpu(part.state_dict()), _to_cpu(optimizer_state_by_name(optimizer, _names(part))))
    mine = whole if first_copy else None
    # the bytes travel on this rank's device (the CPU with gloo, its GPU with nccl)
    gathered = distributed.gather_tensors(mine, next(part.parameters()).device, dst=0)
    if rank != 0:
        return None, None
    parts = [g for g in gathered if g is not None]
    model_state = {}
    for model_part, _ in parts:
        model_state.update(model_part)
    return dict(sorted(model_state.items())), merge_optimizer_states([o for _, o in parts])


def load_full_state_dicts(part: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load whole-model state dicts (as :func:`full_state_dicts` or a non-pipelined trainer with
    name-keyed optimizer state wrote them) into this rank's part and optimizer."""
    current = part.state_dict()
    missing = [k for k in current if k not in model_state]
    if missing:
        raise KeyError(f"missing key(s) in state_dict: {', '.join(missing[:5])}")
    part.load_state_dict({k: _like(model_state[k], current[k]) for k in current})
    load_optimizer_state_by_name(optimizer, optimizer_state, _names(part))
    # a sharded parameter's optimizer state is sharded as the parameter is
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape == param.shape:
                state[key] = _like(value, param)


class PipelineState(ShardedState):
    """What a checkpoint holds of a pipeline: the whole model's state dict and the name-keyed
    optimizer state, gathered from the stages of the first replica onto rank 0 (FIRST_COPY: this
    rank's, ``Mesh.first_copy``), so the checkpoint loads into any layout; every rank restores its
    own stages' share (:func:`load_full_state_dicts`, through :meth:`ShardedState.load`)."""

    restore = staticmethod(load_full_state_dicts)

    def __init__(self, part: nn.Module, optimizer: torch.optim.Optimizer, first_copy: bool, rank: int):
        super().__init__(part, optimizer)
        self.first_copy, self.rank = first_copy, rank

    def state_dicts(self, tokens_seen: int) -> tuple:
        return (*full_state_dicts(self.model, self.optimizer, self.first_copy, self.rank), None)


def _like(full: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """FULL (a whole tensor) laid out as CURRENT: this rank's shard of it, as a DTensor of
    CURRENT's mesh and placements, when CURRENT is one (each rank cuts its own shard: no
    communication); FULL on CURRENT's device otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(full, DTensor) or not isinstance(current, DTensor):
        return full
    full = full.to(device=current.device, dtype=current.dtype)
    return distribute_tensor(full, current.device_mesh, current.placements, src_data_rank=None)


def clip_grad_norm_(part: nn.Module, max_norm: float | None, group) -> float:
    """Clip the gradients of the whole pipeline to a total L2 norm of MAX_NORM (None: do not
    clip), as ``torch.nn.utils.clip_grad_norm_`` does for one model; returns the total norm
    before clipping. Every pipeline rank calls it with its part."""
    from .parallel import sharded_squared_norm

    # the squared norm of this rank's stages (tensor-parallel and FSDP2 shards summed over their
    # ranks), then over the pipeline's ranks
    sq = sharded_squared_norm([p.grad for p in part.parameters() if p.grad is not None])
    torch.distributed.all_reduce(sq, group=group)
    total = sq.sqrt()
    if max_norm is not None:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in part.parameters():
            if p.grad is not None:
                _local(p.grad).detach().mul_(coef.to(p.grad.dtype))
    return float(total)


def all_reduce_grads(part: nn.Module, group) -> None:
    """Sum the gradients of this rank's part over the data-parallel replicas (each replica's
    loss is already divided by the global target count, so the sum is the step's gradient);
    a tensor-parallel gradient shard by shard."""
    for p in part.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(_local(p.grad), group=group)


class PipelineSync(OuterLoop):
    """How a pipeline step is shared over the ranks: the methods of
    :class:`fgc_runtime.step.StepSync` that the generated loop calls around the schedule, for a
    pipeline rank's PART of the model on MESH (a :class:`fgc_runtime.mesh.Mesh` with ``pp``).

    Every rank of a pipeline reads the same batch, so targets and gradients are summed over the
    data-parallel replicas (``mesh.dp_group``). With FSDP2 per stage (SHARDED), FSDP2 averages the
    replicas' gradients, and ``grad_scale`` (the replicas) turns that average into the sum;
    otherwise the gradients are summed after the schedule (:meth:`after_backward`). The
    schedule's losses are on the ranks of the last stage, the first of each tensor-parallel group
    counting them: the loss sum is summed over every rank.

    With DiLoCo (OUTER, a :class:`fgc_runtime.diloco.DiLoCo` over the part), each worker is one
    or more pipelines: "the replicas" and "every rank" are those of the worker, and the step's
    totals, end and evaluation weights are the outer loop's (:class:`fgc_runtime.step.OuterLoop`,
    as for :class:`fgc_runtime.step.StepSync`)."""

    def __init__(self, part: nn.Module, dist, mesh, *, sharded: bool, outer=None):
        self.part, self.dist, self.mesh, self.sharded, self.outer = part, dist, mesh, sharded, outer
        # FSDP2 averages the gradients over the ranks it shards over (a DiLoCo worker's replicas)
        self.grad_scale = mesh.fsdp.size() if sharded else 1
        # the replicas targets and gradients are summed over (a DiLoCo worker's; None: one)
        self.group = mesh.dp_group if outer is None else mesh.worker_group
        self.replicas = mesh.dp_size if self.group is mesh.dp_group else (
            1 if self.group is None else torch.distributed.get_world_size(self.group))

    def wrap(self, pipe: "Pipeline") -> "Pipeline":
        """What the loop runs: the :class:`Pipeline` itself (its schedule syncs nothing within a step)."""
        return pipe

    def micro_batch(self, last: bool):
        """The context of the loop's one micro-batch, the whole batch: the schedule runs its
        micro-batches (FSDP2 per stage reduces the gradients after the last of them)."""
        return contextlib.nullcontext()

    def count(self, n_targets: torch.Tensor) -> torch.Tensor:
        """The step's target count over the data-parallel replicas (in place)."""
        if self.group is not None:
            torch.distributed.all_reduce(n_targets, group=self.group)
        return n_targets

    def after_backward(self) -> None:
        """The gradients summed over the replicas, where FSDP2 does not reduce them."""
        if not self.sharded and self.replicas > 1:
            all_reduce_grads(self.part, self.group)

    def clip_grad_norm(self, max_norm: float | None) -> float:
        """The norm over every stage of the pipeline, after clipping to MAX_NORM (None: not
        clipped)."""
        return clip_grad_norm_(self.part, max_norm, self.mesh.pp_group)

    def loss_sum(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """The step's loss sum on every rank (in place), from the ranks that hold it (a DiLoCo
        worker's, on the worker's ranks)."""
        if self.outer is not None:
            torch.distributed.all_reduce(loss_sum, group=self.mesh.worker_all_group)
            return loss_sum
        return distributed.all_reduce_sum(loss_sum, self.dist)

    def train_state(self, optimizer: torch.optim.Optimizer) -> ModelState:
        """What a checkpoint holds: the whole model, merged from the pipeline ranks of the first
        replica (:class:`PipelineState`); with DiLoCo, its state, the parts of the global model
        and of the outer state merged likewise."""
        if self.outer is not None:
            return self.outer.train_state(self.part, optimizer, first_copy=self.mesh.first_copy)
        return PipelineState(self.part, optimizer, self.mesh.first_copy, self.dist.rank)


def pipeline_sync(plan: dict, dist, mesh, *, model: nn.Module, outer=None) -> PipelineSync:
    """:func:`fgc_runtime.step.step_sync`'s counterpart for a plan with pipeline stages (``PLAN``
    of train.py): the :class:`PipelineSync` of this rank's part (MODEL) on MESH, FSDP2 reducing
    the gradients when the plan shards each stage (``fsdp2 per stage``), OUTER DiLoCo's loop."""
    return PipelineSync(model, dist, mesh, sharded="fsdp2 per stage" in plan["apply_order"], outer=outer)


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict:
    """The optimizer's state dict keyed by parameter names instead of indices (the format of
    ``torch.distributed.checkpoint.state_dict``), so that the parts of several ranks merge."""
    state = optimizer.state_dict()
    index_to_name = {}
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    for index, pid in enumerate(ids):
        index_to_name[index] = names[pid]
    return {
        "state": {index_to_name[i]: s for i, s in state["state"].items()},
        "param_groups": [
            {**g, "params": [index_to_name[i] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def merge_optimizer_states(parts: list[dict]) -> dict:
    """One name-keyed optimizer state from the parts of every rank (groups matched by name)."""
    merged: dict = {"state": {}, "param_groups": []}
    by_name: dict = {}
    for part in parts:
        merged["state"].update(part["state"])
        for group in part["param_groups"]:
            key = group.get("name", len(by_name))
            if key not in by_name:
                by_name[key] = {**group, "params": []}
                merged["param_groups"].append(by_name[key])
            by_name[key]["params"].extend(group["params"])
    return merged


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, state: dict, names: dict[int, str]
) -> None:
    """Load a name-keyed (merged) optimizer state into this rank's optimizer."""
    groups_by_name = {g.get("name", i): g for i, g in enumerate(state["param_groups"])}
    local_state, local_groups, index = {}, [], 0
    for i, group in enumerate(optimizer.param_groups):
        saved = groups_by_name.get(group.get("name", i))
        if saved is None:
            raise RunError(f"the checkpoint has no optimizer group {group.get('name', i)!r}")
        params = []
        for p in group["params"]:
            name = names[id(p)]
            if name in state["state"]:
                local_state[index] = state["state"][name]
            params.append(index)
            index += 1
        local_groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": params})
    optimizer.load_state_dict({"state": local_state, "param_groups": local_groups})
