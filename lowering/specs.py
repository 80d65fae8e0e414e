"""The one resolver of callable specs, serving build time and generated code alike.

Spec forms (docs/language.md):
- ``module.path:Symbol`` or ``module.path:Symbol.attr`` (exactly one ``:``);
- ``path/to/file.py:Symbol``: a file relative to the file that wrote the spec, or absolute;
- ``.module:Symbol``: a module file next to the config, on the config's module search path
  (``submodule_searchpath``, as Forgather's model projects write it) or on the template search path;
- ``module.path.Symbol`` (no colon): resolved by its longest importable module prefix.

Generated code imports ``Symbol.module`` and refers to ``Symbol.qualname`` in it, so what the
compiler checked is exactly what the package runs.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import importlib.machinery
import importlib.util
import operator
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpecError(Exception):
    """A spec that is malformed or does not resolve (the caller adds the location)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True)
class Symbol:
    """A resolved callable."""

    spec: str
    module: str  # importable module name (for file specs: a synthetic name)
    qualname: str  # attribute path inside the module
    obj: Any
    file: str | None = None  # for file/relative specs: the source file (user code)

    @property
    def is_user_code(self) -> bool:
        return self.file is not None


def _getattr_path(obj: Any, qualname: str, spec: str) -> Any:
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{spec!r}: {getattr(obj, '__name__', obj)!r} has no attribute {part!r}") from None
    return obj


def _import(module: str, spec: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise SpecError(f"{spec!r}: no module named {exc.name!r}") from None
    except Exception as exc:  # a module that fails while importing is the user's problem to see
        raise SpecError(f"{spec!r}: importing {module!r} failed: {type(exc).__name__}: {exc}") from None


def _user_package(directory: Path, module_path: list[Path]) -> str:
    """The synthetic package that holds the user's modules of DIRECTORY: its ``__path__`` is the
    directory, then the config's module search path, so that a module's relative imports
    (``from .layers import X``, ``from . import attn``) find its siblings as Forgather's
    ``submodule_searchpath`` finds them."""
    tail = re.sub(r"\W", "_", directory.name) or "root"
    digest = hashlib.sha1(str(directory).encode("utf-8")).hexdigest()[:8]
    name = f"fgc_user_{tail}_{digest}"
    if name not in sys.modules:
        sys.modules[name] = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec(name, None, is_package=True)
        )
    # the config being compiled decides (modules already imported stay as they are)
    sys.modules[name].__path__ = [str(d) for d in [directory] + [d for d in module_path if d != directory]]
    return name


def _user_module_name(path: Path, module_path: list[Path] = ()) -> str:
    """The name the user's module file PATH is imported under (a submodule of its directory's
    synthetic package); vendoring keys the user's modules by it."""
    stem = re.sub(r"\W", "_", path.stem)
    if not stem.isidentifier():
        stem = "_" + stem
    return f"{_user_package(path.parent, list(module_path))}.{stem}"


def _load_file(path: Path, spec: str, module_path: list[Path] = ()):
    name = _user_module_name(path, module_path)
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return name, sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecError(f"{spec!r}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))  # its sibling modules import as they would beside it
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        package = sys.modules[name.rpartition(".")[0]]
        missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if missing and missing.startswith(package.__name__ + "."):
            # a relative import of a sibling that is not there: name it as the user wrote it
            sibling = missing[len(package.__name__) + 1 :]
            raise SpecError(
                f"{spec!r}: a relative import (from .{sibling} ...) in {path} found no module "
                f"{sibling.replace('.', '/')}.py in {', '.join(package.__path__)}"
            ) from None
        raise SpecError(f"{spec!r}: executing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(path.parent))
    return name, module


# Forgather resolves a spec without a colon among the builtins, then among a few names of its
# own; these are those with an exact standard-library twin (operator.call: Python 3.11+).
FORGATHER_BARE = {
    "getitem": ("operator", "getitem"),
    "named_list": ("builtins", "list"),
    "named_tuple": ("builtins", "tuple"),
    "named_dict": ("builtins", "dict"),
    **({"call": ("operator", "call")} if hasattr(operator, "call") else {}),
}
# Its other bare names call a method of their argument; no importable function does that.
FORGATHER_METHOD_NAMES = ("items", "keys", "values", "call")


def _bare(spec: str) -> Symbol:
    """A spec that is one name (``len``, ``getattr``, ``getitem``), resolved as Forgather
    resolves it: a builtin, else one of Forgather's own names that has a standard twin."""
    if hasattr(builtins, spec):
        return Symbol(spec, "builtins", spec, getattr(builtins, spec))
    if spec in FORGATHER_BARE:
        module, name = FORGATHER_BARE[spec]
        return Symbol(spec, module, name, getattr(importlib.import_module(module), name))
    if spec in FORGATHER_METHOD_NAMES:
        raise SpecError(
            f"{spec!r}: Forgather's bare {spec!r} has no importable equivalent",
            hint=f"call the method through its class, e.g. !singleton:builtins:dict.{spec} [*x]"
            if spec != "call"
            else "call the callable itself: !singleton:SPEC [args...]",
        )
    raise SpecError(
        f"malformed spec {spec!r}",
        hint="write module.path:Symbol; one name is a builtin (len, getattr) or Forgather's getitem",
    )


def resolve_spec(
    spec: str, written_in: Path | None = None, search_path: list[Path] = (), module_path: list[Path] = ()
) -> Symbol:
    """Resolve SPEC to the object it names. ``written_in`` is the file whose text holds the spec;
    ``module_path`` is the config's module search path (its ``submodule_searchpath`` directories),
    searched for a ``.module:Symbol`` spec after the spec's own directory and before the template
    search path."""
    if spec.count(":") > 1:
        raise SpecError(f"malformed spec {spec!r}: more than one ':'", hint="write module.path:Symbol")
    if ":" not in spec:
        parts = spec.split(".")
        if not all(p.isidentifier() for p in parts):
            raise SpecError(f"malformed spec {spec!r}", hint="write module.path:Symbol")
        if len(parts) == 1:
            return _bare(spec)
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            qualname = ".".join(parts[cut:])
            return Symbol(spec, module, qualname, _getattr_path(mod, qualname, spec))
        if hasattr(builtins, parts[0]):  # as Forgather: an attribute of a builtin (dict.fromkeys)
            return Symbol(spec, "builtins", spec, _getattr_path(builtins, spec, spec))
        raise SpecError(f"{spec!r}: no importable module prefix")
    target, qualname = spec.split(":")
    if not qualname or not all(p.isidentifier() for p in qualname.split(".")):
        raise SpecError(f"malformed spec {spec!r}: {qualname!r} is not a Python name")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute():
            path = ((written_in.parent if written_in else Path.cwd()) / path).resolve()
        if not path.is_file():
            raise SpecError(f"{spec!r}: no such file {path}")
        name, module = _load_file(path, spec, module_path)
        return Symbol(spec, name, qualname, _getattr_path(module, qualname, spec), file=str(path))
    if target.startswith("."):
        parts = target[1:].split(".")
        if not all(p.isidentifier() for p in parts):
            raise SpecError(f"malformed spec {spec!r}: {target!r} is not a relative module name")
        rel = Path(*parts).with_suffix(".py")
        bases: dict[Path, str] = {}  # each directory searched, in order -> why it is searched
        beside = [(written_in.parent, f"beside {written_in.name}")] if written_in else []
        for base, why in beside + [(d, "submodule_searchpath") for d in module_path] + [
            (d, "template search path") for d in search_path
        ]:
            bases.setdefault(base.resolve(), why)
        for base in bases:
            path = base / rel
            if path.is_file():
                name, module = _load_file(path, spec, module_path)
                return Symbol(spec, name, qualname, _getattr_path(module, qualname, spec), file=str(path))
        raise SpecError(
            f"{spec!r}: no module file {rel.as_posix()}; looked in "
            + ", ".join(f"{b} ({why})" for b, why in bases.items())
        )
    if not all(p.isidentifier() for p in target.split(".")):
        raise SpecError(f"malformed spec {spec!r}: {target!r} is not a module name")
    module = _import(target, spec)
    return Symbol(spec, target, qualname, _getattr_path(module, qualname, spec))


# Forgather's keyword for the directories a model's relative modules are found in: its Latent
# consumes it (it never reaches the callable), and so does fgc
SUBMODULE_SEARCHPATH = "submodule_searchpath"


def take_module_path(ir, sink) -> list[Path]:
    """The config's module search path: the directories of every ``submodule_searchpath:``
    keyword of a call node (a path or a list of paths, relative to the file that wrote each),
    in the order of the nodes' config paths, each list in its own order. The keyword is removed from its node, as Forgather's Latent consumes it;
    a value that is not a path is an error at its line (into SINK)."""
    found: list[Path] = []
    for node in sorted(ir.nodes(), key=lambda n: n.id):
        if node.kind != "call" or SUBMODULE_SEARCHPATH not in node.kwargs:
            continue
        value = ir.node(node.kwargs[SUBMODULE_SEARCHPATH])
        items = None
        if value.kind == "value":
            items = [value]
        elif value.kind in ("list", "tuple"):
            items = [ir.node(c) for c in value.args]
        if items is None or not all(i.kind == "value" and isinstance(i.value, str) and i.value for i in items):
            where = node.key_locs.get(SUBMODULE_SEARCHPATH, node.loc)
            sink.error(f"{SUBMODULE_SEARCHPATH} must be a directory path or a list of them", where)
            continue
        for item in items:
            path = Path(item.value).expanduser()
            if not path.is_absolute():
                path = Path(item.loc.file).parent / path
            if path.resolve() not in found:
                found.append(path.resolve())
        del node.kwargs[SUBMODULE_SEARCHPATH]
        node.key_locs.pop(SUBMODULE_SEARCHPATH, None)
        ir.link(node)
        # drop the paths' nodes nothing else refers to, so that no pass sees them as values
        for child in [value.id] + [i.id for i in items if i is not value]:
            kept = set(ir.targets.values()) | set(ir.definitions.values())
            if child in ir.g and ir.g.in_degree(child) == 0 and child not in kept:
                ir.g.remove_node(child)
    return found
