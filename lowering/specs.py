"""The one resolver of callable specs, serving build time and generated code alike.

Spec forms (docs/language.md):
- ``module.path:Symbol`` or ``module.path:Symbol.attr`` (exactly one ``:``);
- ``path/to/file.py:Symbol``: a file relative to the file that wrote the spec, or absolute;
- ``.module:Symbol``: a module file next to the config or on its search path;
- ``module.path.Symbol`` (no colon): resolved by its longest importable module prefix.

Generated code imports ``Symbol.module`` and refers to ``Symbol.qualname`` in it, so what the
compiler checked is exactly what the package runs.
"""

from __future__ import annotations

import importlib
import importlib.util
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


def _load_file(path: Path, spec: str):
    name = "fgc_user_" + "_".join(path.with_suffix("").parts[-2:]).replace("-", "_").replace(".", "_")
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
        raise SpecError(f"{spec!r}: executing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:
        sys.path.remove(str(path.parent))
    return name, module


def resolve_spec(spec: str, written_in: Path | None = None, search_path: list[Path] = ()) -> Symbol:
    """Resolve SPEC to the object it names. ``written_in`` is the file whose text holds the spec."""
    if spec.count(":") > 1:
        raise SpecError(f"malformed spec {spec!r}: more than one ':'", hint="write module.path:Symbol")
    if ":" not in spec:
        parts = spec.split(".")
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise SpecError(f"malformed spec {spec!r}", hint="write module.path:Symbol")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            qualname = ".".join(parts[cut:])
            return Symbol(spec, module, qualname, _getattr_path(mod, qualname, spec))
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
        name, module = _load_file(path, spec)
        return Symbol(spec, name, qualname, _getattr_path(module, qualname, spec), file=str(path))
    if target.startswith("."):
        rel = Path(*target[1:].split(".")).with_suffix(".py")
        bases = ([written_in.parent] if written_in else []) + list(search_path)
        for base in bases:
            path = (base / rel).resolve()
            if path.is_file():
                name, module = _load_file(path, spec)
                return Symbol(spec, name, qualname, _getattr_path(module, qualname, spec), file=str(path))
        raise SpecError(f"{spec!r}: no module file {rel} next to the config or on the search path")
    if not all(p.isidentifier() for p in target.split(".")):
        raise SpecError(f"malformed spec {spec!r}: {target!r} is not a module name")
    module = _import(target, spec)
    return Symbol(spec, target, qualname, _getattr_path(module, qualname, spec))
