"""DiLoCo's outer loop (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training of
Language Models").

A worker holds a whole model and its own inner optimizer, and trains on its own share of each
global batch with no gradient all-reduce between workers. A worker is one rank, or several that
run DDP inside the worker (``ranks_per_worker``): they hold the same model, and each of them
syncs with the ranks in the same place of the other workers (``outer_group``). Every
``inner_steps`` steps the workers sync: each worker's pseudo-gradient ``global - local`` is
averaged over the workers (one all-reduce), an outer optimizer (SGD with Nesterov momentum) steps
the global parameters with that average as their gradient, and every worker copies the new global
parameters into its model. The inner optimizers' states stay per worker.

The global (outer) parameters and the outer momentum are fp32, on the training device: 8 bytes per
parameter on every rank, plus 4 more during a sync (the averaged pseudo-gradients, one flat
buffer).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist
from torch import nn

from .checkpoint import ModelState, does_not_fit
from .distributed import DistInfo
from .errors import RunError


class DiLoCo:
    """The global parameters of MODEL, its outer optimizer, and where the current round is.

    Build it after the model has its initial weights (the same on every rank): the global
    parameters start as a copy of them. WORKERS (None: one a rank, or as many as OUTER_GROUP has
    ranks) of several ranks each sync over OUTER_GROUP, this rank and the ranks in its place in the
    other workers.
    """

    def __init__(
        self,
        model: nn.Module,
        dist: DistInfo,
        *,
        inner_steps: int,
        outer_lr: float,
        outer_momentum: float,
        workers: int | None = None,
        outer_group=None,
    ):
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1, got {inner_steps}")
        if workers is None:  # one a rank, or one for each rank of OUTER_GROUP
            workers = tdist.get_world_size(outer_group) if outer_group is not None else dist.world_size
        if dist.world_size % workers:
            raise ValueError(f"{dist.world_size} ranks do not form {workers} workers")
        if workers < dist.world_size and outer_group is None:
            raise ValueError("workers of several ranks sync over an outer_group (fgc_runtime.mesh.Mesh's)")
        self.dist = dist
        self.inner_steps = inner_steps
        self.workers = workers
        self.ranks_per_worker = dist.world_size // workers
        # the ranks this one syncs with: one in each worker (None: every rank, a worker each)
        self.outer_group = outer_group
        # trainable parameters by name; a tied weight is yielded (and synced) once
        self.local = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # the global parameters are this rank's shards when a worker shards its model (FSDP2):
        # the ranks in one place of every worker hold the same shards, and sync them
        with torch.no_grad():
            self.outer = {
                n: _local(p).detach().to(dtype=torch.float32, copy=True)
                for n, p in self.local.items()
            }
        # Nesterov needs momentum: with outer_momentum 0 the outer step is plain SGD
        self.outer_optimizer = torch.optim.SGD(
            list(self.outer.values()),
            lr=outer_lr,
            momentum=outer_momentum,
            nesterov=outer_momentum > 0,
        )
        self.inner_step = 0  # inner steps taken since the last sync

    def step(self, *, last: bool = False) -> bool:
        """Count one inner step; sync when the round is complete, or at LAST (the end of training
        ends the round early, so the final model is the global one). True when it synced.
        """
        self.inner_step += 1
        if self.inner_step >= self.inner_steps or last:
            self.sync()
            return True
        return False

    @torch.no_grad()
    def sync(self) -> None:
        """Average the pseudo-gradients over the workers, step the global parameters, and copy
        them into this worker's model (a collective: every rank calls it at the same step).
        """
        outer = list(self.outer.values())
        local = [_local(self.local[n]) for n in self.outer]
        flat = torch.empty(
            sum(g.numel() for g in outer), dtype=torch.float32, device=outer[0].device
        )
        offset = 0
        for g, p in zip(outer, local):
            # the pseudo-gradient, a view into the one buffer the all-reduce sends
            g.grad = flat[offset : offset + g.numel()].view_as(g)
            torch.sub(g, p.float(), out=g.grad)
            offset += g.numel()
        if self.workers > 1:
            tdist.all_reduce(flat, op=tdist.ReduceOp.SUM, group=self.outer_group)
            flat.div_(self.workers)
        self.outer_optimizer.step()
        for g, p in zip(outer, local):
            g.grad = None
            p.copy_(g)
        self.inner_step = 0

    @contextlib.contextmanager
    def global_model(self):
        """Inside, the model holds the global parameters (for evaluation and samples); this
        worker's own parameters are put back exactly on the way out."""
        with torch.no_grad():
            saved = {n: _local(p).detach().clone() for n, p in self.local.items()}
            for n, p in self.local.items():
                _local(p).copy_(self.outer[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.local.items():
                    _local(p).copy_(saved[n])

    def global_state_dict(self, model: nn.Module) -> dict:
        """MODEL's state dict with the global parameters (in the model's dtypes): what a
        checkpoint's ``model.pt``, and so ``--export-hf`` and ``final/``, hold. Whole tensors: a
        sharded worker's are gathered (a collective of the worker's ranks)."""
        state = model.state_dict()
        for name, value in state.items():
            if name in self.outer:
                state[name] = self._full(name, self.outer[name].to(dtype=value.dtype)).cpu()
            elif _is_dtensor(value):
                state[name] = value.full_tensor().cpu()
        return state

    def _full(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor of parameter NAME's shape from this rank's shard LOCAL of it (LOCAL
        itself when the parameter is not sharded; a collective of the worker's ranks when it is)."""
        p = self.local[name]
        if not _is_dtensor(p):
            return local
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
        ).full_tensor()

    def _shard(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of FULL, shaped as parameter NAME (FULL when it is not sharded)."""
        p = self.local[name]
        if not _is_dtensor(p):
            return full
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=_local(p).device)
        return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()

    def state_dict(self, by_name: bool = False) -> dict:
        """The state every worker shares: the fp32 global parameters, the outer optimizer and the
        position in the round (whole tensors: a collective when the workers shard their models).
        BY_NAME: the outer optimizer's state keyed by parameter names, not indices, so that the
        states of a pipeline's parts merge."""
        names = list(self.outer)
        outer_optimizer = self.outer_optimizer.state_dict()
        key = (lambda i: names[i]) if by_name else (lambda i: i)
        outer_optimizer["state"] = {
            key(i): {k: self._full(names[i], v).cpu() if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
            for i, st in outer_optimizer["state"].items()
        }
        if by_name:
            outer_optimizer["param_groups"] = [
                {**g, "params": [names[i] for i in g["params"]]} for g in outer_optimizer["param_groups"]
            ]
        return {
            "outer_params": {n: self._full(n, g.detach()).cpu() for n, g in self.outer.items()},
            "outer_optimizer": outer_optimizer,
            "inner_step": self.inner_step,
            "inner_steps": self.inner_steps,
            "workers": self.workers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` gave (by index, or by name: this rank's parameters of
        a state merged from a pipeline's parts)."""
        missing = sorted(set(self.outer) - set(state["outer_params"]))
        if missing:
            raise KeyError(f"global parameters missing: {', '.join(missing)}")
        with torch.no_grad():
            for n, g in self.outer.items():
                g.copy_(self._shard(n, state["outer_params"][n]))
        names = list(self.outer)
        outer_optimizer = dict(state["outer_optimizer"])
        saved = outer_optimizer["state"]
        if any(isinstance(k, str) for k in saved):  # by name: this rank's parameters only
            index = {n: i for i, n in enumerate(names)}
            saved = {index[n]: st for n, st in saved.items() if n in index}
            outer_optimizer["param_groups"] = [
                {**g, "params": [index[n] for n in g["params"] if n in index]} for g in outer_optimizer["param_groups"]
            ]
        outer_optimizer["state"] = {
            i: {k: self._shard(names[i], v) if torch.is_tensor(v) and v.dim() else v for k, v in st.items()}
            for i, st in saved.items()
        }
        self.outer_optimizer.load_state_dict(outer_optimizer)
        self.inner_step = state["inner_step"]

    def train_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, first_copy: bool | None = None
    ) -> "DiLoCoState":
        """What a checkpoint holds of this run (:class:`DiLoCoState`); FIRST_COPY for a
        pipeline rank's part (``Mesh.first_copy``): the parts are merged on rank 0."""
        return DiLoCoState(model, optimizer, self, first_copy=first_copy)

    def global_sum(self, values: list[float]) -> list[float]:
        """VALUES summed over the workers (float64; a collective): the logged loss, target count
        and gradient norm are global although nothing else is synced between rounds. Each value
        is its worker's: the same on every rank of a worker (a value that differs between them
        counts as their mean)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        if self.dist.distributed:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
            t.div_(self.ranks_per_worker)
        return t.tolist()


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of T (a DTensor: FSDP2's sharded parameters), T itself otherwise. Under
    no_grad, the very tensor the parameter keeps: writing into it writes the parameter."""
    return t.to_local() if _is_dtensor(t) else t


def check_resume(state: dict, world_size: int, path, workers: int | None = None) -> dict:
    """This worker's piece of a checkpoint (its own model, inner optimizer and token count); a
    RunError when the checkpoint is not a DiLoCo one or was written by another number of ranks or
    WORKERS (None: one a rank).
    """
    written_by = state["manifest"].get("world_size")
    if (
        not isinstance(state.get("optimizer"), dict)
        or "outer_params" not in state["optimizer"]
    ):
        raise RunError(
            "not a DiLoCo checkpoint: it has no global parameters or outer optimizer",
            path=path,
        )
    if written_by != world_size:
        raise RunError(
            f"this DiLoCo checkpoint was written by {written_by} ranks, and this run has {world_size}: "
            f"each worker's own model and inner optimizer are in it, so resume with {written_by} processes",
            path=path,
        )
    # a checkpoint written before workers were recorded had one worker a rank
    written_workers = state["optimizer"].get("workers", written_by)
    workers = world_size if workers is None else workers
    if written_workers != workers:
        raise RunError(
            f"this DiLoCo checkpoint was written by {written_workers} workers, and this run has {workers}: "
            f"each worker's own model and inner optimizer are in it, so resume with a package built with -D diloco_workers={written_workers}",
            path=path,
        )
    if state.get("rank_state") is None:
        raise RunError("the checkpoint has no state for this worker", path=path)
    return state["rank_state"]


class DiLoCoState(ModelState):
    """What a checkpoint holds of a DiLoCo run: ``model.pt`` the global parameters (what
    ``--export-hf`` and ``final/`` write), ``optimizer.pt`` the fp32 global parameters, the outer
    optimizer and the position in the round, and each rank's ``state-rank<R>.pt`` its worker's own
    model, inner optimizer and token count. A checkpoint of another number of ranks or workers is
    refused: the workers' own states do not carry over.

    With a pipeline inside each worker, MODEL is a pipeline rank's part (its stages, under the
    whole model's parameter names) and FIRST_COPY says whether this rank's part is one the
    shared state is taken from (``Mesh.first_copy``): the global parameters and the outer state
    of those parts are gathered and merged on rank 0, the outer optimizer's state keyed by
    parameter name."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, diloco: DiLoCo, first_copy: bool | None = None
    ):
        super().__init__(model, optimizer)
        self.diloco = diloco
        self.first_copy = first_copy

    def state_dicts(self, tokens_seen: int) -> tuple:
        # a sharded worker's own state is this rank's shards, as plain tensors
        own_model = {k: _local(v).detach() for k, v in self.model.state_dict().items()}
        own_optimizer = self.optimizer.state_dict()
        own_optimizer["state"] = {i: {k: _local(v) for k, v in st.items()} for i, st in own_optimizer["state"].items()}
        own = {"model": own_model, "optimizer": own_optimizer, "tokens_seen": tokens_seen}
        if self.first_copy is None:
            return self.diloco.global_state_dict(self.model), self.diloco.state_dict(), own
        model_state, outer = self._merged_parts()
        return model_state, outer, own

    def _merged_parts(self) -> tuple:
        """The global model's state dict and the outer state, merged on rank 0 from the parts of
        the first copy's pipeline ranks ((None, None) on the other ranks; every rank calls it)."""
        from .distributed import gather_tensors

        mine = (self.diloco.global_state_dict(self.model), self.diloco.state_dict(by_name=True))
        device = _local(next(self.model.parameters())).device
        gathered = gather_tensors(mine if self.first_copy else None, device, dst=0)
        if gathered is None:
            return None, None
        parts = [g for g in gathered if g is not None]
        model_state, outer = {}, dict(parts[0][1])
        outer["outer_params"] = {}
        outer["outer_optimizer"] = {"state": {}, "param_groups": [dict(g, params=[]) for g in parts[0][1]["outer_optimizer"]["param_groups"]]}
        for part_model, part_outer in parts:
            model_state.update(part_model)
            outer["outer_params"].update(part_outer["outer_params"])
            outer["outer_optimizer"]["state"].update(part_outer["outer_optimizer"]["state"])
            # the outer optimizer has one group: its parameters are every part's
            for merged, group in zip(outer["outer_optimizer"]["param_groups"], part_outer["outer_optimizer"]["param_groups"]):
                merged["params"] = merged["params"] + list(group["params"])
        return dict(sorted(model_state.items())), outer

    def total_tokens(self, tokens_seen: int) -> int:
        """Over all workers (a collective)."""
        return int(self.diloco.global_sum([tokens_seen])[0])

    def load(self, state: dict, path) -> int:
        # this worker's own model and inner optimizer, then the global parameters and the outer
        # optimizer; this worker's token count
        mine = check_resume(state, self.diloco.dist.world_size, path, workers=self.diloco.workers)
        try:
            if any(_is_dtensor(p) for p in self.model.parameters()):
                self._load_shards(mine["model"], mine["optimizer"])
            else:
                self.model.load_state_dict(mine["model"])
                self.optimizer.load_state_dict(mine["optimizer"])
            self.diloco.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError) as err:  # a different model shape
            raise does_not_fit(err, path) from None
        return mine["tokens_seen"]

    def _load_shards(self, model_state: dict, optimizer_state: dict) -> None:
        """Put this rank's saved shards (plain tensors, as :meth:`state_dicts` wrote them) back into
        a sharded model and its optimizer."""
        current = self.model.state_dict()
        missing = [k for k in current if k not in model_state]
        if missing:
            raise KeyError(f"missing key(s) in state_dict: {', '.join(missing[:5])}")
        with torch.no_grad():
            for name, value in current.items():
                _local(value).copy_(model_state[name])
        # the optimizer's state tensors of a sharded parameter are sharded as the parameter is
        from torch.distributed.tensor import DTensor

        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        state = dict(optimizer_state)
        state["state"] = {}
        for i, st in optimizer_state["state"].items():
            p = params[int(i)]
            state["state"][i] = {
                k: DTensor.from_local(
                    v.to(_local(p).device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
                )
                if _is_dtensor(p) and torch.is_tensor(v) and v.shape == _local(p).shape and v.dim()
                else v
                for k, v in st.items()
            }
        self.optimizer.load_state_dict(state)
