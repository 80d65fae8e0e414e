"""The optimizer step fused into the backward: each parameter is updated as soon as its gradient
is complete, and the gradient is freed at once, so a step never holds every gradient.

Only for one process without gradient accumulation or clipping (fgc checks this at build time):
the step of a parameter happens before any other gradient is known, so nothing that needs all of
them (a norm, an all-reduce, a sum over micro-batches) can run first.
"""

from __future__ import annotations

from typing import Callable

import torch


class OptimizerInBackward(torch.optim.Optimizer):
    """One inner optimizer per parameter, made by ``factory(param_groups)`` with that parameter's
    group settings, stepped by a post-accumulate-grad hook.

    It is an ``Optimizer`` for the learning-rate scheduler and the checkpoint: ``param_groups``
    are the groups passed in (a scheduler's lr changes reach every inner optimizer at its next
    step), ``step()`` does nothing (the steps happened in the backward), and ``state_dict()``
    holds every inner optimizer's state.
    """

    def __init__(self, param_groups: list[dict], factory: Callable[[list[dict]], torch.optim.Optimizer]):
        first = next(p for g in param_groups for p in g["params"])
        # the factory's own defaults (lr, betas, ...) fill in what the groups leave out
        super().__init__(param_groups, defaults=dict(factory([{"params": [first]}]).defaults))
        self._inner: list[tuple[torch.optim.Optimizer, dict]] = []
        self._handles = []
        for group in self.param_groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                inner = factory([{**settings, "params": [p]}])
                self._inner.append((inner, group))
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(inner, group)))

    @staticmethod
    def _hook(inner: torch.optim.Optimizer, group: dict):
        def step(param: torch.Tensor) -> None:
            for key, value in group.items():  # the scheduler's current lr, and the rest
                if key != "params":
                    inner.param_groups[0][key] = value
            inner.step()
            inner.zero_grad(set_to_none=True)

        return step

    @torch.no_grad()
    def step(self, closure=None):
        """Nothing: every parameter stepped during the backward."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient is freed right after its step."""

    def state_dict(self) -> dict:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"param_groups": groups, "inner": [inner.state_dict() for inner, _ in self._inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict.get("inner", ())) != len(self._inner) or len(state_dict["param_groups"]) != len(
            self.param_groups
        ):
            raise ValueError("the optimizer state does not match this model's parameters")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        for (inner, _), saved in zip(self._inner, state_dict["inner"]):
            inner.load_state_dict(saved)
