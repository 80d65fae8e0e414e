"""Shell completion of a config's ``-D`` knobs (``fgc build CONFIG -D <TAB>``).

Click completes the commands, options and paths itself (``eval "$(_FGC_COMPLETE=bash_source
fgc)"``, or ``zsh_source``/``fish_source``); a ``-D`` completes to ``NAME=`` for every knob of the
config named before it: a name the config's templates read with a default (``NAME |
default(...)``), which is what ``-D NAME=VALUE`` sets.
"""

from __future__ import annotations

import re
from pathlib import Path

_KNOB = re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\s*\|\s*default\s*\(")


def knob_names(config: Path | None, project: Path | None = None, include_dirs=(), variables=None) -> list[str]:
    """The knobs of CONFIG, sorted; empty when the config cannot be rendered (completion never
    fails loudly)."""
    from .frontend.render import render

    try:
        rendered = render(config, include_dirs, variables or {}, project)
    except Exception:  # noqa: BLE001 - any failure: nothing to offer
        return []
    defaulted = set()
    for tf in rendered.loader.files.values():
        defaulted.update(_KNOB.findall(tf.source))
    return sorted(name for name in rendered.referenced & defaulted if not name.startswith("_"))


def complete_define(ctx, param, incomplete: str):
    """Click's completion callback of ``-D``: ``NAME=`` for each knob starting with INCOMPLETE."""
    from click.shell_completion import CompletionItem

    if "=" in incomplete:
        return []  # a value: nothing to suggest
    params = ctx.params
    config = params.get("config")
    if config is None:
        # a `-D` still waiting for its value stops click's parse: CONFIG is then among the words
        # it left unparsed
        config = next((Path(word) for word in ctx.args if not word.startswith("-")), None)
    if config is None and params.get("project") is None:
        return []
    names = knob_names(config, params.get("project"), params.get("include_dirs") or ())
    return [CompletionItem(f"{name}=") for name in names if name.startswith(incomplete)]
