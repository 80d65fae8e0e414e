"""Optimizer parameter groups chosen by regular expressions over parameter names;
:class:`MuonAdamW`, Muon for hidden weight matrices with AdamW for the rest; and :class:`AdamW`
and :class:`Adafactor`, which keep their state in fp32 whatever the parameters' dtype and can
write bf16 parameters back with stochastic rounding (:func:`stochastic_round_to_bf16`).

By default, norms, biases and embeddings get no weight decay (decaying them toward zero only
hurts); every other parameter is in the group that takes the optimizer's own settings.
"""

from __future__ import annotations

import re
import warnings
from typing import NamedTuple, Sequence

import torch
from torch import nn

from . import cpu_adamw
from .errors import RunError


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


# -- fp32 state and bf16 stochastic rounding --------------------------------------------------------

_BF16_DROPPED_BITS = 1 << 16  # an fp32 value's low 16 bits: what bf16 drops from its bit pattern


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (fp32, or anything ``.float()`` takes) rounded to bf16 stochastically: up to the next
    bf16 value with probability equal to the distance from the one below, so that the rounding is
    unbiased, ``E[round(x)] == x``.

    Uniform random bits are added below bf16's mantissa in the fp32 bit pattern, which is then
    truncated. A bit pattern is sign and magnitude, so this rounds the magnitude and negative
    numbers are handled like positive ones; a value above the largest bf16 may round to inf, as
    its carry reaches the exponent. inf and nan are returned as they are (adding bits to them
    would change a nan's payload or make an inf a nan). ``generator`` (on ``x``'s device) gives
    the random bits.
    """
    x = x.float()
    noise = torch.randint(0, _BF16_DROPPED_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    # -65536 is 0xFFFF0000: keep the sign, exponent and bf16's 7 mantissa bits
    rounded = (x.view(torch.int32) + noise).bitwise_and_(-_BF16_DROPPED_BITS).view(torch.float32)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    return rounded.to(torch.bfloat16)  # exact: the dropped bits are zero


class _Fp32StateOptimizer(torch.optim.Optimizer):
    """What :class:`AdamW` and :class:`Adafactor` share: state tensors in fp32 whatever the
    parameter dtype (also after ``load_state_dict``, which in torch casts floating-point state to
    the parameter's dtype), the update computed in fp32, and a bf16 parameter written back
    rounded to nearest or, with the group's ``bf16_stochastic_round``, stochastically.

    The random bits come from generators the optimizer owns, one per device type, seeded with
    ``seed`` (default: ``torch.initial_seed()`` when the optimizer is made, which is the run's
    seed after ``torch.manual_seed``; every rank of a data-parallel job then rounds alike and the
    replicas stay equal). Their states are in ``state_dict()["stochastic_rounding"]`` and
    ``load_state_dict`` restores them, so a resumed run draws the same bits.
    """

    def __init__(self, params, defaults: dict, seed: int | None):
        super().__init__(params, defaults)
        self._seed = int(torch.initial_seed() if seed is None else seed)
        self._generators: dict[str, torch.Generator] = {}
        # loaded states of generators not made yet (by device type)
        self._rng_states: dict[str, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        """torch's optimizer pickles its defaults, state and groups: this one also its seed and
        its generators' states (so that ``copy.deepcopy`` and pickle keep them)."""
        state = super().__getstate__()
        rng = dict(self._rng_states)
        rng.update({kind: gen.get_state() for kind, gen in self._generators.items()})
        state.update(_seed=self._seed, _rng_states=rng)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._generators = {}  # made again from _rng_states on first use

    def _generator(self, device: torch.device) -> torch.Generator:
        """This optimizer's generator on DEVICE, made on first use."""
        gen = self._generators.get(device.type)
        if gen is None:
            gen = torch.Generator(device=device)
            if device.type in self._rng_states:
                gen.set_state(self._rng_states.pop(device.type))
            else:
                gen.manual_seed(self._seed)
            self._generators[device.type] = gen
        elif gen.device != device:
            raise ValueError(
                f"bf16 stochastic rounding keeps one generator per device type: parameters on "
                f"{gen.device} and {device} cannot share an optimizer"
            )
        return gen

    def _write_back(self, param: torch.Tensor, value: torch.Tensor, group: dict) -> None:
        """Store the fp32 VALUE in a parameter of another dtype."""
        if param.dtype == torch.bfloat16 and group["bf16_stochastic_round"]:
            param.copy_(stochastic_round_to_bf16(value, self._generator(param.device)))
        else:
            param.copy_(value)  # rounded to nearest

    def _fp32_state(self, param: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)

    def state_dict(self) -> dict:
        """torch's optimizer state dict, plus ``stochastic_rounding``: the seed and the state of
        each generator (made or loaded)."""
        state = super().state_dict()
        rng = dict(self._rng_states)
        rng.update({kind: gen.get_state() for kind, gen in self._generators.items()})
        state["stochastic_rounding"] = {"seed": self._seed, "rng": rng}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like any torch optimizer, keep the state in fp32, and restore the generators."""
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        for saved_id, param in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            for key, value in (saved or {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    # torch cast it to the parameter's dtype: take the saved fp32 value again
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32)
        rounding = state_dict.get("stochastic_rounding")
        if rounding is not None:
            self._seed = int(rounding["seed"])
            self._generators = {}
            self._rng_states = dict(rounding["rng"])

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter that has a gradient: ``_update`` changes an fp32 value of
        the parameter (the parameter itself when it is fp32, else a copy written back)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if torch.is_complex(param):
                    raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
                in_place = param.dtype == torch.float32
                value = param if in_place else param.float()
                grad = param.grad if param.grad.dtype == torch.float32 else param.grad.float()
                self._update(value, grad, self.state[param], group)
                if not in_place:
                    self._write_back(param, value, group)
        return loss

    def _update(self, value: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Step VALUE (fp32, in place) with GRAD (fp32); STATE is the parameter's state dict."""
        raise NotImplementedError


# -- the fused AdamW step: one compiled function over every parameter --------------------------------

_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # the integer hash's multiplier (< 2**27: its products of 32-bit values fit int64)
_INDEX_MUL = 0x9E3779B1  # 2**32 over the golden ratio: spreads consecutive element indices


def _mix32(x):
    """An integer hash of X in [0, 2**32), a Python int or an int64 tensor (elementwise): the
    same operations on both, each product below 2**59."""
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def rounding_key(seed: int, step: int, index: int) -> int:
    """The 32-bit key of one parameter's stochastic rounding at one step: a hash of the
    optimizer's seed, the step and the parameter's index in the optimizer."""
    return _step_key(_seed_key(seed), step, index)


def _seed_key(seed: int) -> int:
    """The first half of :func:`rounding_key`, the seed's, the same for every parameter and step."""
    return _mix32(_mix32(seed & _M32) ^ ((seed >> 32) & _M32))


def _step_key(seed_key: int, step: int, index: int) -> int:
    """:func:`rounding_key` from the seed's half of it."""
    return _place_key(_step_half(seed_key, step), index)


def _step_half(seed_key: int, step: int) -> int:
    """The part of :func:`_step_key` that every parameter at STEP shares."""
    return _mix32(seed_key ^ (step & _M32))


def _place_key(step_half: int, index: int) -> int:
    """:func:`_step_key` from its STEP_HALF and the parameter's place INDEX."""
    return _mix32(step_half ^ (index & _M32))


def hashed_rounding_bits(shape: torch.Size, key: torch.Tensor) -> torch.Tensor:
    """16 random bits per element of SHAPE (int32 in [0, 65536)): a hash of the element's index
    and KEY (a 0-d int64 tensor, :func:`rounding_key`), with integer operations only, so that
    eager and compiled code give the same bits and a step's bits depend on nothing but its key.
    The values stay below 2**32 in int64, where every product fits (tensors of up to 2**31
    elements): no overflow anywhere."""
    index = torch.arange(shape.numel(), dtype=torch.int64, device=key.device).view(shape)
    return (_mix32(((index * _INDEX_MUL) & _M32) ^ key) >> 16).to(torch.int32)


def _round_to_bf16(value: torch.Tensor, bits: torch.Tensor | None) -> torch.Tensor:
    """VALUE (fp32) in bf16: to nearest when BITS is None, else stochastically with those random
    bits (as :func:`stochastic_round_to_bf16`; inf and nan unchanged)."""
    if bits is None:
        return value.to(torch.bfloat16)
    rounded = (value.view(torch.int32) + bits).bitwise_and(-_BF16_DROPPED_BITS).view(torch.float32)
    return torch.where(torch.isfinite(value), rounded, value).to(torch.bfloat16)


def _fused_adamw_step(params, grads, exp_avgs, exp_avg_sqs, scalars, keys, stochastic: tuple) -> None:
    """One AdamW step of every parameter, the math of :meth:`AdamW._update` in fp32, each
    parameter read and written once. SCALARS (fp64, one row per parameter): the weight-decay
    factor, 1 - beta1, beta2, 1 - beta2, the step size, the root of the second bias correction
    and eps; KEYS (int64): each parameter's :func:`rounding_key`; STOCHASTIC: for each parameter,
    whether it is bf16 and rounded stochastically. Compiled by :func:`_fused_step`; the CPU
    kernel (:mod:`fgc_runtime.cpu_adamw`) does the same operations in C, in this order: a change
    here is one there too (tests/test_cpu_adamw.py compares the two bitwise)."""
    for i, param in enumerate(params):
        decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bias2_sqrt, eps = scalars[i].float().unbind()
        grad = grads[i].float()
        exp_avg = exp_avgs[i].lerp(grad, one_minus_beta1)
        exp_avg_sq = exp_avg_sqs[i] * beta2 + grad * grad * one_minus_beta2
        denom = exp_avg_sq.sqrt() / bias2_sqrt + eps
        value = param.float() * decay - step_size * (exp_avg / denom)
        exp_avgs[i].copy_(exp_avg)
        exp_avg_sqs[i].copy_(exp_avg_sq)
        if param.dtype == torch.bfloat16:
            bits = hashed_rounding_bits(param.shape, keys[i]) if stochastic[i] else None
            param.copy_(_round_to_bf16(value, bits))
        else:
            param.copy_(value)


_compiled_step = None


class _Views(NamedTuple):
    """What :meth:`AdamW._fused_views` keeps of a parameter from one fused step to the next."""

    exp_avg: torch.Tensor  # its state tensors and step count, which the views are valid for
    exp_avg_sq: torch.Tensor
    step: torch.Tensor
    data_ptr: int  # where its data was
    flats: tuple  # flat views (or copies) of the parameter, exp_avg and exp_avg_sq
    on_kernel: bool  # whether the CPU kernel steps them


class _Entry(NamedTuple):
    """One parameter in a fused step."""

    views: _Views
    grad: torch.Tensor
    group: dict
    index: int  # its place in the optimizer: part of its rounding key
    stochastic: bool  # whether it is bf16 and rounded stochastically


def _fused_step():
    """:func:`_fused_adamw_step` compiled by torch.compile, made on first use: the fused step of
    the tensors the CPU kernel does not take (:mod:`fgc_runtime.cpu_adamw`). It compiles again
    for another list of parameters (after the first time with their sizes as symbols, torch's
    automatic dynamic shapes: so optimizers of one parameter each, as the step in the backward
    makes, share a few compiled graphs)."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(_fused_adamw_step, fullgraph=True)
    return _compiled_step


class AdamW(_Fp32StateOptimizer):
    """AdamW (Loshchilov & Hutter 2019): Adam with bias correction and decoupled weight decay, the
    math of ``torch.optim.AdamW`` (without amsgrad). With fp32 parameters it runs torch's
    single-tensor steps in torch's order, so it matches ``torch.optim.AdamW(..., foreach=False)``
    bitwise (and the default ``torch.optim.AdamW`` on the CPU, which is that).

    ``exp_avg`` and ``exp_avg_sq`` are fp32 whatever the parameter dtype. For a bf16 (or fp16)
    parameter the step is computed on an fp32 copy and written back rounded to nearest, or, with
    ``bf16_stochastic_round=True`` and a bf16 parameter, stochastically
    (:func:`stochastic_round_to_bf16`): updates smaller than bf16's resolution then still move
    the weights on average. For fp32 parameters ``bf16_stochastic_round`` does nothing, so one
    optimizer can hold a mixed model. ``seed``: see :class:`_Fp32StateOptimizer`.

    ``fused=True``: the step of every parameter is the math of :func:`_fused_adamw_step`, which
    reads and writes each parameter, gradient and state once: on the CPU, for fp32 and bf16
    weights, by the C kernel of :mod:`fgc_runtime.cpu_adamw` (built by the machine's C compiler
    on the first step); elsewhere, or where that kernel does not build (a warning says why), by
    the function compiled by ``torch.compile`` (a C++ compiler is needed on the CPU). The two
    give the same values bitwise. Its fp32 math is this class's, though not bitwise (operations
    fused and ordered otherwise). Its stochastic rounding draws its bits from a hash of the
    element's index and a key made of the seed, the step and the parameter's place in the
    optimizer (:func:`hashed_rounding_bits`) instead of the generators: as unbiased, and as
    exact on resuming, since the key is in the checkpoint (the seed, and each parameter's step).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        bf16_stochastic_round: bool = False,
        *,
        seed: int | None = None,
        fused: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"invalid betas: {betas} (each in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "bf16_stochastic_round": bool(bf16_stochastic_round),
        }
        super().__init__(params, defaults, seed)
        self.fused = bool(fused)
        # the fused step of CPU tensors by fgc_runtime.cpu_adamw's kernel (else the compiled function),
        # and why not when that kernel did not build
        self._cpu_kernel = True
        self._kernel_why_not = ""
        # the fused step's flat views of each parameter and its state, made once (_fused_views)
        self._flat_views: dict = {}

    def _fused_views(self, param: torch.Tensor, state: dict, copies: list) -> _Views:
        """For the fused step: PARAM's ``exp_avg``, ``exp_avg_sq`` and step count (made on its
        first step), its data pointer, flat views of the parameter and the two states (flat: one
        compiled graph fits tensors of any shape) and whether the CPU kernel steps them, kept
        for the next steps while the four stay the same tensors (``load_state_dict`` makes new
        state tensors; ``param.data = ...`` moves the data; until the parameter's next step its
        old views keep its old data alive). A tensor that is not contiguous is flattened into a
        copy each step instead, which COPIES gets to write back after the step."""
        if torch.is_complex(param):
            raise RuntimeError("AdamW does not support complex parameters")
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = self._fp32_state(param)
            state["exp_avg_sq"] = self._fp32_state(param)
        flats, copied = [], len(copies)
        for tensor in (param, state["exp_avg"], state["exp_avg_sq"]):
            # detached: kept from one step to the next, a view made in no_grad mode of a parameter
            # would be refused when torch.compile traces the step again
            flats.append(tensor.detach().contiguous().view(-1))
            if flats[-1].data_ptr() != tensor.data_ptr():
                copies.append((tensor, flats[-1]))
        on_kernel = self._cpu_kernel and cpu_adamw.supports(*flats, state["step"])
        views = _Views(state["exp_avg"], state["exp_avg_sq"], state["step"], param.data_ptr(), tuple(flats), on_kernel)
        if len(copies) == copied:
            self._flat_views[param] = views
        else:
            self._flat_views.pop(param, None)
        return views

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "fused": self.fused}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._cpu_kernel, self._kernel_why_not = True, ""
        self._flat_views = {}  # views of the tensors it was copied from

    def load_state_dict(self, state_dict: dict) -> None:
        self._flat_views.clear()  # views of the state tensors being replaced
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        if not self.fused:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # each parameter with a gradient: (its flat views, its gradient, its group, its place in the
        # optimizer (part of its rounding key), whether it is rounded stochastically), the ones the
        # CPU kernel steps, then the others
        on_kernel, on_compiled = [], []
        copies = []  # (tensor, its flat contiguous copy) to write back after the step
        index = -1
        for group in self.param_groups:
            rounding = group["bf16_stochastic_round"]
            for param in group["params"]:
                index += 1
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                stochastic = rounding and param.dtype == torch.bfloat16
                if stochastic and param.numel() >= 2**31:
                    raise ValueError(
                        f"AdamW(fused=True) rounds tensors of fewer than 2**31 elements stochastically, "
                        f"not one of {param.numel()}: use fused=False"
                    )
                state = self.state[param]
                views = self._flat_views.get(param)
                if (
                    views is None
                    or views.exp_avg is not state.get("exp_avg")
                    or views.exp_avg_sq is not state.get("exp_avg_sq")
                    or views.step is not state.get("step")
                    or views.data_ptr != param.data_ptr()
                ):
                    views = self._fused_views(param, state, copies)
                entry = _Entry(views, grad, group, index, stochastic)
                if views.on_kernel and type(grad) is torch.Tensor and grad.dtype in cpu_adamw.DTYPES and grad.is_contiguous():
                    on_kernel.append(entry)
                else:
                    on_compiled.append(entry)
        lib = None
        if on_kernel:
            lib, why_not = cpu_adamw.library()
            if lib is None:
                self._cpu_kernel, self._kernel_why_not = False, why_not
                self._flat_views.clear()  # their on_kernel flags
                warnings.warn(
                    f"fgc_runtime.optim.AdamW(fused=True): the CPU kernel did not build ({why_not}); "
                    "the step runs compiled by torch.compile instead",
                    stacklevel=4,  # the caller of step, past torch's two wrappers (its hooks, no_grad)
                )
                on_compiled, on_kernel = on_kernel + on_compiled, []
        entries = on_kernel + on_compiled
        if entries:
            rows, keys = self._fused_scalars(entries, len(on_kernel))
            if on_kernel:
                cpu_adamw.step(
                    lib,
                    [(e.views.flats[0], e.grad, *e.views.flats[1:], e.views.step, e.stochastic) for e in on_kernel],
                    rows[: len(on_kernel)],
                    keys[: len(on_kernel)],
                )
            if on_compiled:
                self._compiled_call(on_compiled, rows[len(on_kernel) :], keys[len(on_kernel) :])
        for tensor, flat in copies:
            tensor.copy_(flat.view(tensor.shape))
        return loss

    def _compiled_call(self, entries: list, rows: list, keys: list) -> None:
        """The fused step of ENTRIES (of :meth:`step`) by the compiled function, with their ROWS
        of scalars and rounding KEYS. On the CPU, where the C kernel did not build and
        torch.compile cannot compile either (no C++ compiler), a :class:`RunError` says so."""
        device = entries[0].grad.device
        try:
            _fused_step()(
                [e.views.flats[0] for e in entries],
                [e.grad.contiguous().view(-1) for e in entries],  # flat, a copy of one that is not contiguous
                [e.views.flats[1] for e in entries],
                [e.views.flats[2] for e in entries],
                torch.tensor(rows, dtype=torch.float64, device=device),
                torch.tensor(keys, dtype=torch.int64, device=device),
                tuple(e.stochastic for e in entries),
            )
        except torch._dynamo.exc.BackendCompilerFailed as error:
            if device.type != "cpu" or not self._kernel_why_not:
                raise
            inner = getattr(error, "inner_exception", None) or error
            lines = str(inner).strip().splitlines() or [""]
            raise RunError(
                f"fgc_runtime.optim.AdamW(fused=True) needs a C compiler on the CPU: its C kernel did not "
                f"build ({self._kernel_why_not}), nor did torch.compile's step ({type(inner).__name__}: "
                f"{lines[0]}); install one (cc, gcc or clang), or build without -D fused_optimizer=true"
            ) from error

    def _fused_scalars(self, entries: list, counted: int) -> tuple[list, list]:
        """The rows of scalars (of :func:`_fused_adamw_step`) and rounding keys of ENTRIES (of
        :meth:`step`) for their next step; the step counts of all but the first COUNTED (which
        the CPU kernel counts) counted."""
        steps = [e.views.step for e in entries]
        counts = torch.stack([s.cpu() for s in steps]).add_(1).tolist()  # in fp32, as counted
        if counted < len(steps):
            torch._foreach_add_(steps[counted:], 1)
        rows, keys, made, step_halves = [], [], {}, {}
        seed_key = _seed_key(self._seed)
        for step, entry in zip(counts, entries):
            group = entry.group
            row = made.get((id(group), step))
            if row is None:
                lr, weight_decay, eps = float(group["lr"]), group["weight_decay"], group["eps"]
                beta1, beta2 = group["betas"]
                # the scalars of _update, in fp64 as Python computes them there
                row = made[id(group), step] = (
                    1 - lr * weight_decay,
                    1 - beta1,
                    beta2,
                    1 - beta2,
                    lr / (1 - beta1**step),
                    (1 - beta2**step) ** 0.5,
                    eps,
                )
            rows.append(row)
            half = step_halves.get(step)
            if half is None:
                half = step_halves[step] = _step_half(seed_key, int(step))
            keys.append(_place_key(half, entry.index))
        return rows, keys

    def _update(self, value, grad, state, group):
        lr, weight_decay, eps = float(group["lr"]), group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = self._fp32_state(value)
            state["exp_avg_sq"] = self._fp32_state(value)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # torch's _single_tensor_adam, op for op
        state["step"] += 1
        step = state["step"].item()
        if weight_decay != 0:
            value.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        value.addcdiv_(exp_avg, denom, value=-step_size)


class Adafactor(_Fp32StateOptimizer):
    """Adafactor (Shazeer & Stern 2018, "Adaptive Learning Rates with Sublinear Memory Cost").

    The second moment of a parameter of 2 or more dimensions is factored over its last two: a
    running mean of the squared gradient over each row (``row_var``, shape ``(..., R, 1)``) and
    over each column (``col_var``, ``(..., 1, C)``), whose product over the mean of ``row_var``
    estimates it; a 1-D parameter keeps the full running mean (``variance``). The averaging
    weight of step ``t`` is ``1 - beta2_t = t ** beta2_decay`` (default -0.8: the first step
    takes the squared gradient whole). ``eps = (eps1, eps2)``: eps1 is added to the squared
    gradient before it is averaged (as in the paper), eps2 is the least parameter RMS that
    ``scale_parameter`` uses. The update (gradient over the root of the estimate) is divided by
    ``max(1, RMS(update) / clip_threshold)``; with ``beta1`` (default None: no first moment, the
    paper's choice to save memory) a running mean of the clipped updates is applied instead.

    The step is ``lr`` times the update. ``relative_step=True`` makes the learning rate
    ``min(lr, 1/sqrt(t))``, and ``scale_parameter=True`` multiplies it by
    ``max(eps2, RMS(parameter))``; with both, this is torch.optim.Adafactor's step, whose ``d``
    is ``clip_threshold`` here. Weight decay is decoupled: ``param *= 1 - lr * weight_decay``
    before the update, as in torch.optim.Adafactor and AdamW. The names follow
    ``torch.optim.Adafactor`` (``lr``, ``beta2_decay``, ``eps``, ``weight_decay``, the state's
    ``row_var``, ``col_var``, ``variance``), with the paper's ``clip_threshold`` and ``beta1``.
    It differs from torch's in where eps1 goes (the paper's place, so the default eps1 of 1e-30
    works in fp32) and in the order of a few operations: in fp32 the two agree to rounding.

    State is fp32 whatever the parameter dtype; bf16 parameters and ``bf16_stochastic_round``
    are as in :class:`AdamW`.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta1: float | None = None,
        beta2_decay: float = -0.8,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
        relative_step: bool = False,
        scale_parameter: bool = False,
        bf16_stochastic_round: bool = False,
        *,
        seed: int | None = None,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"invalid beta1: {beta1} (None, or in [0, 1))")
        if not beta2_decay <= 0.0:
            raise ValueError(f"invalid beta2_decay: {beta2_decay} (<= 0)")
        if len(eps) != 2 or not eps[0] > 0.0 or not eps[1] >= 0.0:
            raise ValueError(f"invalid eps: {eps} (a pair: eps1 > 0, eps2 >= 0)")
        if not clip_threshold >= 1.0:
            raise ValueError(f"invalid clip_threshold: {clip_threshold} (>= 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = {
            "lr": lr,
            "beta1": beta1,
            "beta2_decay": beta2_decay,
            "eps": tuple(eps),
            "clip_threshold": clip_threshold,
            "weight_decay": weight_decay,
            "relative_step": bool(relative_step),
            "scale_parameter": bool(scale_parameter),
            "bf16_stochastic_round": bool(bf16_stochastic_round),
        }
        super().__init__(params, defaults, seed)

    def _update(self, value, grad, state, group):
        lr, weight_decay, beta1 = float(group["lr"]), group["weight_decay"], group["beta1"]
        eps1, eps2 = group["eps"]
        factored = grad.dim() > 1
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if factored:
                state["row_var"] = grad.new_zeros(grad.shape[:-1] + (1,))
                state["col_var"] = grad.new_zeros(grad.shape[:-2] + (1, grad.shape[-1]))
            else:
                state["variance"] = self._fp32_state(grad)
            if beta1 is not None:
                state["exp_avg"] = self._fp32_state(grad)

        state["step"] += 1
        t = state["step"].item()
        one_minus_beta2 = t ** group["beta2_decay"]
        rho = min(lr, 1 / t**0.5) if group["relative_step"] else lr
        # the step size: a number, or with scale_parameter a tensor (no host sync)
        alpha = rho
        if group["scale_parameter"]:
            alpha = _rms(value).clamp_(min=eps2).mul_(rho)
        if weight_decay != 0:
            value.mul_(1 - lr * weight_decay)

        if factored:
            # mean of (g^2 + eps1) over a row / a column, without a g-sized temporary
            row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_()
            state["row_var"].lerp_(row_mean.div_(grad.size(-1)).add_(eps1), one_minus_beta2)
            col_mean = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()
            state["col_var"].lerp_(col_mean.div_(grad.size(-2)).add_(eps1), one_minus_beta2)
            # g / sqrt(V) with V = row_var col_var / mean(row_var); the two factors apart
            # keep a zero gradient's update finite (row_var col_var may underflow)
            row_var, col_var = state["row_var"], state["col_var"]
            update = grad * (row_var / row_var.mean(dim=-2, keepdim=True)).rsqrt_()
            update.mul_(col_var.rsqrt())
        else:
            state["variance"].lerp_(grad.square().add_(eps1), one_minus_beta2)
            update = grad * state["variance"].rsqrt()
        update.div_(_rms(update).div_(group["clip_threshold"]).clamp_(min=1.0))
        if beta1 is not None:
            state["exp_avg"].lerp_(update, 1 - beta1)
            update = state["exp_avg"]
        if torch.is_tensor(alpha):
            value.addcmul_(update, alpha, value=-1)
        else:
            value.add_(update, alpha=-alpha)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """The root mean square of X, a 0-d tensor."""
    return torch.linalg.vector_norm(x).div_(x.numel() ** 0.5)
