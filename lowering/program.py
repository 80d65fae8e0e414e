"""The training program: what lowering decides, in one typed, serialisable value.

``fgc build --dump-after PASS`` prints it after the pass (beside the IR graph), and a package's
``manifest.json`` carries its plan. It holds:

- ``settings``: the trainer's typed settings (``fgc.settings``), as plain data;
- ``plan``: how the package runs (:class:`fgc_lowering.plan.Plan`): ranks, batches, the mesh of
  parallel dimensions, the tensor-parallel and pipeline plans, the kernel choices, and
  ``vocab_growth`` when a pretrained model's vocabulary grows to its data's
  (``lowering/plan_vocab.py``);
- ``provenance``: for every setting, the config line that set it (``default`` when none did).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Callable

from .plan import Plan


@dataclass(frozen=True)
class Program:
    """The decisions of lowering that codegen specialises a package to."""

    settings: Any  # a fgc.settings trainer (a frozen dataclass)
    plan: Plan
    provenance: dict[str, str]  # "group.field" -> "FILE:LINE" or "default"

    def to_data(self) -> dict:
        """Plain JSON-able data: settings as nested dicts (their class under ``type``)."""
        return {"settings": _data(self.settings), "plan": self.plan.to_data(), "provenance": dict(self.provenance)}

    def dump(self) -> str:
        """The program as indented JSON, keys in a fixed order."""
        return json.dumps(self.to_data(), indent=2, default=str)


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
