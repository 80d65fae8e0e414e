"""The state the lowering passes share, beside the IR graph itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgc.errors import DiagnosticSink

from .specs import Symbol


@dataclass
class LoweringContext:
    """What a pass may read or add to: the config's variables, resolved symbols and the plan."""

    config: Path  # the root config file (absolute)
    search_path: list[Path]
    variables: dict[str, Any] = field(default_factory=dict)  # -D NAME=VALUE
    template_names: set[str] | None = None  # names the templates read (None: do not check -D use)
    sink: DiagnosticSink = field(default_factory=DiagnosticSink)
    symbols: dict[str, Symbol] = field(default_factory=dict)  # call node id -> its callable
    settings: Any = None  # the trainer settings object (fgc.settings), built by the plan pass
    plan: Any = None  # fgc_lowering.plan.Plan
    meta_model: Any = None  # the model built on the meta device (construct.meta_model), or its error
    provenance: dict = field(default_factory=dict)  # settings path -> the config line that set it
    # Location -> [(Location, "-D NAME=VALUE" or None)]: where a value printed at a template line
    # was set, oldest first (fgc.frontend.render.Rendered.origins_of); None: the line itself
    origins: Any = None
    # the config's own train.py flags (its dynamic_args): name -> fgc_lowering.dynamic_args.DynamicArg
    dynamic_args: dict = field(default_factory=dict)

    def program(self, ir: Any = None, source: Any = None):
        """The training program lowering has decided so far, over the graph IR of the rendered
        config SOURCE (None before the plan exists)."""
        from .construct import meta_model
        from .program import Program

        if self.settings is None or self.plan is None:
            return None
        return Program(
            self.settings,
            self.plan,
            self.provenance,
            graph=ir,
            symbols=dict(self.symbols),
            flags=dict(self.dynamic_args),
            source=source,
            variables=dict(self.variables),
            model_on_meta=(lambda: meta_model(ir, self)) if ir is not None else None,
        )
