"""Optimizer parameter groups chosen by regular expressions over parameter names.

By default, norms, biases and embeddings get no weight decay (decaying them toward zero only
hurts); every other parameter is in the group that takes the optimizer's own settings.
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import nn


def param_groups(model: nn.Module, no_weight_decay: Sequence[str]) -> list[dict]:
    """``[{"name": "decay", ...}, {"name": "no_decay", "weight_decay": 0.0, ...}]`` for an optimizer.

    A parameter is in ``no_decay`` when one of the patterns matches (``re.search``) its name.
    A parameter shared by several modules (tied weights) appears once, under its first name.
    Empty groups are left out.
    """
    patterns = [re.compile(p) for p in no_weight_decay]
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # shared parameters are yielded once
        if not param.requires_grad:
            continue
        (no_decay if any(p.search(name) for p in patterns) else decay).append(param)
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
