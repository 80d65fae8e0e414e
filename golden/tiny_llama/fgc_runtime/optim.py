"""Optimizer parameter groups chosen by regular expressions over parameter names, and
:class:`MuonAdamW`, Muon for hidden weight matrices with AdamW for the rest.

By default, norms, biases and embeddings get no weight decay (decaying them toward zero only
hurts); every other parameter is in the group that takes the optimizer's own settings.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, no_weight_decay: Sequence[str], with_names: bool = False) -> list[dict]:
    """``[{"name": "decay", ...}, {"name": "no_decay", "weight_decay": 0.0, ...}]`` for an optimizer.

    A parameter is in ``no_decay`` when one of the patterns matches (``re.search``) its name.
    A parameter shared by several modules (tied weights) appears once, under its first name.
    Empty groups are left out. ``with_names``: each group's ``params`` are ``(name, parameter)``
    pairs, which torch optimizers keep as the group's ``param_names`` (:class:`MuonAdamW` needs
    them).
    """
    patterns = [re.compile(p) for p in no_weight_decay]
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared parameters are yielded once
        if not param.requires_grad:
            continue
        entry = (name, param) if with_names else param
        (no_decay if any(p.search(name) for p in patterns) else decay).append(entry)
    groups = []
    if decay:
        groups.append({"name": "decay", "params": decay})
    if no_decay:
        groups.append({"name": "no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def describe_groups(model: nn.Module, optimizer) -> str:
    """One line per parameter: its name, shape and the optimizer group it is in, with the group's
    learning rate and weight decay."""
    where = {}
    for index, group in enumerate(optimizer.param_groups):
        for param in group["params"]:
            where[id(param)] = (group.get("name", str(index)), group.get("lr"), group.get("weight_decay"))
    lines = []
    for name, param in model.named_parameters():
        group, lr, wd = where.get(id(param), ("(not optimized)", None, None))
        lines.append(f"{name}  {tuple(param.shape)}  group={group}  lr={lr}  weight_decay={wd}")
    return "\n".join(lines)


class MuonAdamW(torch.optim.Optimizer):
    """Muon (``torch.optim.Muon``) for the 2-D weight matrices of the hidden layers, AdamW for
    everything else (embeddings, the output head, norms, biases), as one optimizer.

    ``params`` are parameter groups whose parameters carry their names (``param_groups(model,
    patterns, with_names=True)``, or ``model.named_parameters()``): a parameter goes to Muon when
    it is 2-D and no pattern of ``adamw_params`` matches (``re.search``) its name. Each group is
    split in two, ``muon/NAME`` and ``adamw/NAME``, keeping its own settings (e.g. a group's
    ``weight_decay: 0.0``). Muon's update is scaled with ``adjust_lr_fn`` (default
    ``match_rms_adamw``, Liu et al. 2025, "Muon is Scalable for LLM Training", which lets Muon
    share AdamW's learning rate and weight decay), so one ``lr`` and one schedule drive both.

    The groups of both live in :attr:`param_groups` (an lr scheduler sees them all) and their
    state in :attr:`state`, so ``state_dict()`` and ``load_state_dict()`` round-trip like any
    torch optimizer's.
    """

    needs_param_names = True  # a generated train.py passes param_groups(..., with_names=True)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        adamw_params: Sequence[str] = ("embed", "lm_head"),
    ):
        patterns = [re.compile(p) for p in adamw_params]
        muon_groups, adamw_groups = [], []
        for group in _named_groups(params):
            settings = {k: v for k, v in group.items() if k not in ("params", "param_names", "name")}
            name = group.get("name", "params")
            split = {"muon": [], "adamw": []}
            for pname, param in zip(group["param_names"], group["params"]):
                to_muon = param.ndim == 2 and not any(p.search(pname) for p in patterns)
                split["muon" if to_muon else "adamw"].append((pname, param))
            for kind, target in (("muon", muon_groups), ("adamw", adamw_groups)):
                if split[kind]:
                    target.append({**settings, "name": f"{kind}/{name}", "optimizer": kind, "params": split[kind]})
        self._muon = (
            torch.optim.Muon(
                muon_groups,
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr_fn=adjust_lr_fn,
            )
            if muon_groups
            else None
        )
        self._adamw = (
            torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            if adamw_groups
            else None
        )
        inner = [o for o in (self._muon, self._adamw) if o is not None]
        # The inner optimizers' group dicts become this optimizer's (shared, not copied).
        super().__init__([g for o in inner for g in o.param_groups], {"lr": lr})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this optimizer's groups and state (again after a load,
        which replaces both)."""
        for kind, inner in (("muon", self._muon), ("adamw", self._adamw)):
            if inner is not None:
                inner.param_groups = [g for g in self.param_groups if g["optimizer"] == kind]
                inner.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like any optimizer, then re-link the Muon and AdamW halves."""
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step of the Muon groups and one AdamW step of the others."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in (self._muon, self._adamw):
            if inner is not None:
                inner.step()
        return loss


def _named_groups(params) -> list[dict]:
    """Parameter groups with ``params`` and ``param_names`` lists; a ValueError when a parameter
    has no name."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [{"params": params}]
    groups = []
    for group in params:
        entries = list(group["params"])
        if not all(isinstance(e, tuple) for e in entries):
            raise ValueError(
                "MuonAdamW needs parameter names: pass param_groups(model, ..., with_names=True) "
                "or model.named_parameters()"
            )
        groups.append({**group, "param_names": [n for n, _ in entries], "params": [p for _, p in entries]})
    return groups
