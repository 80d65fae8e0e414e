"""The config's own ``train.py`` flags: its ``dynamic_args`` (Forgather's name and shape).

A config declares them in the root key ``dynamic_args``, a mapping (or Forgather's ``!dlist``)
NAME -> {names, type, help, choices, action, default}. A declared NAME binds every ``!var NAME``
at run time: the resolve-variables pass binds the var to its build-time value (``-D NAME``, else
the var's default, else the declared default), so that every later pass checks that value, and
records the bound nodes here; codegen emits each of them as ``flags.NAME`` (the parsed flag, whose
default is that build-time value) in train.py's optimizer and lr_scheduler factories.

A value that fgc itself reads at build time (the model's, which is built on the meta device and
planned; the trainer settings; a few keys codegen or the checks read) cannot change at run time:
:func:`check_run_time_reads` makes that a build error naming what reads it.
"""

from __future__ import annotations

import functools
import keyword
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgc.errors import Location
from fgc.ir import IRGraph, Node

from .context import LoweringContext

TARGET = "dynamic_args"  # the root key that declares them
FIELDS = ("names", "type", "help", "choices", "action", "default")
TYPES = ("int", "float", "str", "bool", "path")
ACTIONS = ("store_true", "store_false")
# the targets whose code train.py builds at run time, where a flag's value can reach
RUN_TIME_TARGETS = ("optimizer", "lr_scheduler")
# what reads a target's values at build time
BUILD_TIME_READERS = {
    "model": "to build the model on the meta device and plan its shapes, parameters and parallel layout",
    "trainer": "to plan the training (the trainer settings)",
}
# keys of a run-time target that fgc still reads at build time
BUILD_TIME_KEYS = {
    ("lr_scheduler", "budget_unit"): "to choose how train.py calls the schedule (budgets in steps or tokens)",
    ("optimizer", "bf16_stochastic_round"): "to check it against the precision",
}
_FLAG_RE = re.compile(r"^(--[A-Za-z0-9][A-Za-z0-9_-]*|-[A-Za-z])$")
_ADD_ARGUMENT_RE = re.compile(r'add_argument\(\s*((?:"-[^"]+",\s*)+)')
_NOT_PLAIN = object()


@dataclass
class DynamicArg:
    """One declared flag: what the config wrote, and the build-time value its ``!var``s took."""

    name: str
    loc: Location  # the declaration's line
    flags: list[str]
    type: str = "str"
    help: str | None = None
    choices: list | None = None
    action: str | None = None
    default: Any = None  # the declared default
    has_default: bool = False
    value: Any = None  # the build-time value: the flag's default in train.py
    value_loc: Location | None = None
    nodes: list[str] = field(default_factory=list)  # the value nodes that the flag's value replaces at run time
    read: bool = False  # some !var names it (bound or not)

    def accepts(self, value: Any) -> bool:
        """Whether VALUE is one the flag can hold (None: no value; the config may leave it unset)."""
        if value is None:
            return True
        kind = "bool" if self.action else self.type
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        return isinstance(value, str)


@functools.lru_cache(maxsize=1)
def builtin_flags() -> tuple[str, ...]:
    """The flags a train.py may declare itself (read from its template and the templates of its
    features, so the two never disagree)."""
    import fgc_codegen_templates

    templates = Path(fgc_codegen_templates.__file__).parent
    found = {"-h", "--help"}
    for path in [templates / "train.py.j2", *sorted((templates / "features").glob("*.j2"))]:
        for match in _ADD_ARGUMENT_RE.finditer(path.read_text(encoding="utf-8")):
            found.update(re.findall(r'"(-[^"]+)"', match.group(1)))
    return tuple(sorted(found))


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _plain(ir: IRGraph, nid: str) -> Any:
    """A value node's scalar, or a list/tuple of them as a list; _NOT_PLAIN for anything else."""
    node = ir.node(nid)
    if node.kind == "value":
        return node.value
    if node.kind in ("list", "tuple"):
        items = [_plain(ir, c) for c in node.args]
        return _NOT_PLAIN if any(i is _NOT_PLAIN or isinstance(i, list) for i in items) else items
    return _NOT_PLAIN


def _entries(ir: IRGraph, root: Node, ctx: LoweringContext) -> list[tuple[str, str, Location]]:
    """(NAME, node id, location of NAME) of each declaration."""
    if root.kind == "dict":
        return [(k, c, root.key_locs.get(k, root.loc)) for k, c in root.kwargs.items()]
    if root.kind == "list" and (len(root.key_locs) == len(root.args) or not root.args):  # !dlist
        return [(k, c, loc) for (k, loc), c in zip(root.key_locs.items(), root.args)]
    if root.kind == "value" and root.value is None:
        return []
    ctx.sink.error(
        "dynamic_args must be a mapping of NAME: {names: --flag, type: ..., help: ...}",
        root.loc,
        hint="each NAME binds !var NAME to train.py's flag",
    )
    return []


def parse_declarations(ir: IRGraph, ctx: LoweringContext) -> dict[str, DynamicArg]:
    """The config's dynamic_args, checked; each mistake is an error at its line."""
    if TARGET not in ir.targets:
        return {}
    root = ir.node(ir.targets[TARGET])
    builtins = builtin_flags()
    builtin_dests = {_dest(f) for f in builtins if f.startswith("--")}
    out: dict[str, DynamicArg] = {}
    seen_flags: dict[str, str] = {}
    for name, nid, name_loc in _entries(ir, root, ctx):
        node = ir.node(nid)
        if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
            ctx.sink.error(
                f"dynamic arg {name!r}: its name must be a Python identifier (it is the !var it binds)",
                name_loc,
            )
            continue
        if node.kind != "dict":
            ctx.sink.error(
                f"dynamic arg {name!r} must be a mapping: {{names: --flag, type: ..., help: ...}}", node.loc
            )
            continue
        values: dict[str, Any] = {}
        ok = True
        for key, child in node.kwargs.items():
            loc = node.key_locs.get(key, node.loc)
            if key not in FIELDS:
                ctx.sink.error(
                    f"dynamic arg {name!r}: unknown field {key!r}", loc, hint="fields: " + ", ".join(FIELDS)
                )
                ok = False
                continue
            value = _plain(ir, child)
            if value is _NOT_PLAIN:
                ctx.sink.error(f"dynamic arg {name!r}: {key} must be a plain value", loc)
                ok = False
                continue
            values[key] = (value, loc)
        if not ok:
            continue
        arg = _declaration(name, name_loc, values, ctx, builtins, builtin_dests, seen_flags)
        if arg is not None:
            out[name] = arg
    return out


def _declaration(name, loc, values, ctx, builtins, builtin_dests, seen_flags) -> DynamicArg | None:
    """One declaration's fields checked (VALUES: field -> (value, location)); None after an error."""

    def err(message: str, key: str | None = None, hint: str | None = None) -> None:
        ctx.sink.error(f"dynamic arg {name!r}: {message}", values[key][1] if key in values else loc, hint=hint)

    arg = DynamicArg(name, loc, [])
    if "names" not in values:
        err("it needs names: the flag, e.g. names: --" + name.replace("_", "-"))
        return None
    names, _ = values["names"]
    names = [names] if isinstance(names, str) else names
    if not names or not all(isinstance(n, str) for n in names):
        err("names must be a flag (--name) or a list of flags", "names")
        return None
    failed = False
    for flag in names:
        if not _FLAG_RE.match(flag):
            err(f"{flag!r} is not a flag name: write --name (or -x for a short one)", "names")
            failed = True
        elif flag in builtins:
            err(f"{flag} is one of train.py's own flags", "names", hint="train.py's flags: " + " ".join(builtins))
            failed = True
        elif flag in seen_flags:
            err(f"{flag} is declared twice (also by {seen_flags[flag]!r})", "names")
            failed = True
    if name in builtin_dests:
        err(f"its name is that of train.py's own --{name.replace('_', '-')} (args.{name})", None)
        failed = True
    if failed:
        return None
    for flag in names:
        seen_flags[flag] = name
    arg.flags = list(names)
    if "action" in values:
        action, _ = values["action"]
        if action not in ACTIONS:
            err(f"action {action!r} is not one of {', '.join(ACTIONS)}", "action")
            return None
        if "type" in values and values["type"][0] != "bool":
            err(f"action {action} makes a bool flag: leave out type, or write type: bool", "type")
            return None
        if "choices" in values:
            err(f"action {action} takes no choices", "choices")
            return None
        arg.action, arg.type = action, "bool"
    elif "type" in values:
        kind, _ = values["type"]
        if kind not in TYPES:
            err(f"type {kind!r} is not one of {', '.join(TYPES)}", "type")
            return None
        arg.type = kind
    if "help" in values:
        text, _ = values["help"]
        if not isinstance(text, str):
            err("help must be text", "help")
            return None
        arg.help = text
    if "choices" in values:
        choices, _ = values["choices"]
        if not isinstance(choices, list) or not choices or not all(arg.accepts(c) and c is not None for c in choices):
            err(f"choices must be a list of {arg.type} values", "choices")
            return None
        arg.choices = choices
    if "default" in values:
        default, _ = values["default"]
        if not arg.accepts(default):
            err(f"default {default!r} is not a {arg.type} value", "default")
            return None
        arg.default, arg.has_default = default, True
    return arg


def bind(ir: IRGraph, ctx: LoweringContext, node: Node, arg: DynamicArg) -> Node | None:
    """The value node that replaces the ``!var`` NODE of a declared flag: its build-time value
    (``-D``, else the var's default, else the declared default); None after an error."""
    name = node.value
    arg.read = True
    if name in ctx.variables:
        value, where = ctx.variables[name], Location("<command line>")
    elif node.default is not None:
        value, where = _plain(ir, node.default), ir.node(node.default).loc
        if value is _NOT_PLAIN or isinstance(value, list):
            ctx.sink.error(f"!var {name} is the train.py flag {arg.flags[0]}: its default must be a plain value", where)
            return None
    elif arg.has_default:
        value, where = arg.default, arg.loc
    else:
        ctx.sink.error(
            f"variable {name!r} is not bound and has no default",
            node.loc,
            hint=f"pass -D {name}=VALUE, write !var {{name: {name}, default: ...}} or give dynamic_args.{name} a default",
        )
        return None
    if not arg.accepts(value):
        ctx.sink.error(
            f"!var {name} is the train.py flag {arg.flags[0]} of type {arg.type}, but its value {value!r} is not a {arg.type}",
            where,
            hint=f"declared at {arg.loc}",
        )
        return None
    if arg.choices is not None and value is not None and value not in arg.choices:
        ctx.sink.error(
            f"!var {name}: {value!r} is not one of the flag's choices {arg.choices!r}", where, hint=f"declared at {arg.loc}"
        )
        return None
    if arg.nodes and (type(value), value) != (type(arg.value), arg.value):
        ctx.sink.error(
            f"!var {name} is {value!r} here but {arg.value!r} at {arg.value_loc}: the flag {arg.flags[0]} has one default",
            where,
        )
        return None
    arg.value, arg.value_loc = value, where
    arg.nodes.append(node.id)
    return Node(node.id, "value", node.loc, value=value)


def check_unused(ir: IRGraph, ctx: LoweringContext) -> None:
    """A declared flag that no ``!var`` reads is an error (as a -D that nothing reads)."""
    for name, arg in ctx.dynamic_args.items():
        if arg.read:
            continue
        hint = "write !var " + name + " where its value goes"
        if ctx.template_names is not None and name in ctx.template_names:
            hint = (
                f"the templates read {name!r}: fgc binds dynamic args to !var at run time; "
                "templates render at build time: use -D"
            )
        ctx.sink.error(f"dynamic arg {name!r}: no !var of this config reads it", arg.loc, hint=hint)


def flag_nodes(flags: dict[str, DynamicArg]) -> dict[str, str]:
    """Node id -> the flag's NAME, for every value a flag of FLAGS replaces at run time."""
    return {nid: name for name, arg in flags.items() for nid in arg.nodes}


def check_run_time_reads(ir: IRGraph, flags: dict[str, DynamicArg]) -> list[tuple[str, Location, str]]:
    """(message, location, hint) for each flag's value that fgc reads at build time (the model,
    the trainer settings, a key that codegen or the checks read) or that no target of train.py
    reads at all: such a value cannot change at run time."""
    nodes = flag_nodes(flags)
    if not nodes:
        return []
    reach = {t: set(ir.reachable(nid)) for t, nid in ir.targets.items() if t != TARGET}
    errors = []
    for nid, name in nodes.items():
        if nid not in ir.g:
            continue
        arg = flags[name]
        loc = ir.node(nid).loc
        hint = f"the flag is declared at {arg.loc}"
        head = f"!var {name} is the train.py flag {arg.flags[0]}, but"
        readers = [t for t, below in reach.items() if nid in below]
        for target in readers:
            if target not in RUN_TIME_TARGETS:
                why = BUILD_TIME_READERS.get(target, "(train.py builds only the optimizer and lr_scheduler at run time)")
                errors.append((f"{head} the {target!r} target reads it at build time {why}; set it with -D {name}=VALUE", loc, hint))
                continue
            root = ir.node(ir.targets[target])
            for (t, key), why in BUILD_TIME_KEYS.items():
                if t == target and key in root.kwargs and nid in ir.reachable(root.kwargs[key]):
                    errors.append((f"{head} {target}.{key} is read at build time {why}; set it with -D {name}=VALUE", loc, hint))
        if not readers:
            errors.append((f"{head} neither the optimizer nor the lr_scheduler target reads it", loc, hint))
    return errors
