"""The training program: what lowering decides, in one typed, serialisable value.

``fgc build --dump-after PASS`` prints it after the pass (beside the IR graph), and a package's
``manifest.json`` carries its plan. It holds:

- ``settings``: the trainer's typed settings (``fgc.settings``), as plain data;
- ``plan``: how the package runs (:class:`fgc_lowering.plan.Plan`): ranks, batches, the mesh of
  parallel dimensions, the tensor-parallel and pipeline plans, the kernel choices, and
  ``vocab_growth`` when a pretrained model's vocabulary grows to its data's
  (``lowering/plan_vocab.py``);
- ``provenance``: for every setting, the config line that set it (``default`` when none did).
- ``graph``: the lowered config graph (``fgc.ir.IRGraph``): the targets codegen writes out as code
  (the model, the optimizer, the schedule), every node with its file and line;
- ``symbols``: for each call node of the graph, the callable it resolved to;
- ``flags``: the config's own ``train.py`` flags (its ``dynamic_args``) and the nodes each replaces;
- ``source``: the rendered config (``fgc.frontend.render.Rendered``): its path, its text (the
  package's ``config.yaml``), the template files it read and where each knob was set;
- ``variables``: the ``-D`` values of the build.

It is the single input of codegen (``fgc.codegen.package.PackageBuilder``). ``to_data`` serialises
the decisions (settings, plan, provenance), the flags and which callable each node resolved to;
the graph has its own dump (``fgc.ir.IRGraph.dump``), printed before it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .plan import Plan


@dataclass(frozen=True)
class Program:
    """The decisions of lowering that codegen specialises a package to, and the graph it emits."""

    settings: Any  # a fgc.settings trainer (a frozen dataclass)
    plan: Plan
    provenance: dict[str, str]  # "group.field" -> "FILE:LINE" or "default"
    graph: Any = None  # fgc.ir.IRGraph, lowered
    symbols: Mapping[str, Any] = field(default_factory=dict)  # call node id -> fgc_lowering.specs.Symbol
    flags: Mapping[str, Any] = field(default_factory=dict)  # NAME -> fgc_lowering.dynamic_args.DynamicArg
    source: Any = None  # fgc.frontend.render.Rendered
    variables: Mapping[str, Any] = field(default_factory=dict)  # -D NAME=VALUE
    # The model target on the meta device, built once (by a pass, or at the first call); not data.
    model_on_meta: Callable[[], Any] | None = field(default=None, compare=False, repr=False)

    @property
    def config(self) -> Path:
        """The root config file (absolute)."""
        return self.source.source.path

    def to_data(self) -> dict:
        """Plain JSON-able data: settings as nested dicts (their class under ``type``)."""
        return {
            "settings": _data(self.settings),
            "plan": self.plan.to_data(),
            "provenance": dict(self.provenance),
            "flags": {name: _flag_data(arg) for name, arg in sorted(self.flags.items())},
            "callables": {nid: f"{s.module}:{s.qualname}" for nid, s in sorted(self.symbols.items())},
        }

    def dump(self) -> str:
        """The program as indented JSON, keys in a fixed order."""
        return json.dumps(self.to_data(), indent=2, default=str)


def _flag_data(arg: Any) -> dict:
    """A train.py flag as data: its option strings, type, default, help and the nodes it replaces."""
    return {
        "flags": list(arg.flags),
        "type": arg.type,
        "default": repr(arg.default),
        "value": repr(arg.value),  # at build time: the flag's default in train.py
        "help": arg.help,
        "nodes": sorted(arg.nodes),
        "declared_at": str(arg.loc),
    }


def _data(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, **{f.name: _data(getattr(value, f.name)) for f in fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_data(v) for v in value]
    return value


def provenance(settings: Any, where: Callable[..., Any], is_set: Callable[..., bool]) -> dict[str, str]:
    """Each setting's dotted path -> the config line that set it (``where(*path)``), or
    ``default`` when the config does not set it (``is_set(*path)`` is false)."""
    out: dict[str, str] = {}

    def visit(obj: Any, path: tuple[str, ...]) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            key = (*path, f.name)
            if is_dataclass(value) and not isinstance(value, type):
                visit(value, key)
            else:
                out[".".join(key)] = str(where(*key)) if is_set(*key) else "default"

    visit(settings, ())
    return out
