"""Vendoring: copy the source of the component classes a config uses into the generated package.

Component modules (``fgc.components.*``, and the families' parts, ``fgc.families.NAME.parts``) are parsed with libcst; only the top-level definitions the
package needs are kept (following names used inside them, across component modules), imports
between component modules are dropped (everything lands in one ``model.py``), and the remaining
imports are kept only when a kept definition uses the name they bind.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import libcst as cst

VENDORED_PREFIX = "fgc.components"
# the model families' own parts (fgc/families/NAME/parts.py) are copied like the library's
FAMILY_PREFIX = "fgc.families."


def is_vendored_module(module: str) -> bool:
    return module == VENDORED_PREFIX or module.startswith((VENDORED_PREFIX + ".", FAMILY_PREFIX))


class _Names(cst.CSTVisitor):
    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)


def _used_names(node: cst.CSTNode) -> set[str]:
    visitor = _Names()
    node.visit(visitor)
    return visitor.names


def _bound_names(stmt: cst.CSTNode) -> list[str]:
    """Names a top-level statement defines."""
    if isinstance(stmt, (cst.ClassDef, cst.FunctionDef)):
        return [stmt.name.value]
    if isinstance(stmt, cst.SimpleStatementLine):
        out = []
        for small in stmt.body:
            if isinstance(small, (cst.Assign,)):
                for t in small.targets:
                    if isinstance(t.target, cst.Name):
                        out.append(t.target.value)
            elif isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name):
                out.append(small.target.value)
        return out
    return []


def _import_aliases(stmt: cst.SimpleStatementLine) -> list[tuple[cst.BaseSmallStatement, str, str]]:
    """(import statement, module, bound name) for each alias in an import line."""
    out = []
    for small in stmt.body:
        if isinstance(small, cst.Import):
            for alias in small.names:
                full = cst.Module([]).code_for_node(alias.name)
                bound = alias.asname.name.value if alias.asname else full.split(".")[0]
                out.append((small, full, bound))
        elif isinstance(small, cst.ImportFrom) and not isinstance(small.names, cst.ImportStar):
            module = cst.Module([]).code_for_node(small.module) if small.module else ""
            for alias in small.names:
                name = cst.Module([]).code_for_node(alias.name)
                bound = alias.asname.name.value if alias.asname else name
                out.append((small, module, bound))
    return out


@dataclass
class _Definition:
    module: str
    index: int
    name: str
    node: cst.CSTNode
    deps: set[tuple[str, str]] = field(default_factory=set)  # (module, name)
    imports: set[str] = field(default_factory=set)  # the import lines it needs
    import_modules: set[str] = field(default_factory=set)  # the modules those lines import


@dataclass
class VendoredCode:
    """What vendoring produced: import lines and definition source, in dependency order."""

    imports: list[str]
    definitions: list[tuple[str, str, str]]  # (module file, name, source)
    names: set[str]
    members: set[tuple[str, str]] = field(default_factory=set)  # (module, name) vendored

    def holds(self, module: str, qualname: str) -> bool:
        """Whether the symbol module:qualname is defined in the vendored code."""
        return (module, qualname.split(".")[0]) in self.members


class VendorError(Exception):
    """Code that cannot be vendored (the caller adds the config location)."""


class Vendorer:
    """Collects the definitions a package needs from component modules and the user's own files.

    ``files`` maps a user module's (synthetic) name to its file and the name to show for it.
    """

    def __init__(self, files: dict[str, tuple[Path, str]] | None = None) -> None:
        self._modules: dict[str, dict] = {}
        self._files = files or {}

    def _module(self, module: str) -> dict:
        if module in self._modules:
            return self._modules[module]
        if module in self._files:
            path, shown = self._files[module]
        else:
            path = Path(importlib.import_module(module).__file__)
            root = Path(importlib.import_module("fgc").__file__).parent
            shown = f"fgc/{path.relative_to(root).as_posix()}"
        tree = cst.parse_module(path.read_text(encoding="utf-8"))
        defs: dict[str, _Definition] = {}
        imports: dict[str, tuple[str, str]] = {}  # bound name -> (import line source, source module)
        for index, stmt in enumerate(tree.body):
            if isinstance(stmt, cst.SimpleStatementLine) and any(
                isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body
            ):
                for small in stmt.body:
                    if isinstance(small, cst.ImportFrom) and small.relative:
                        raise VendorError(
                            f"{shown}: a relative import ({cst.Module([]).code_for_node(small)}) "
                            "cannot be vendored; import the module by its absolute name"
                        )
                for small, mod, bound in _import_aliases(stmt):
                    if isinstance(small, cst.ImportFrom):
                        alias = next(
                            a for a in small.names  # type: ignore[union-attr]
                            if (a.asname.name.value if a.asname else cst.Module([]).code_for_node(a.name)) == bound
                        )
                        line = f"from {mod} import {cst.Module([]).code_for_node(alias.name)}"
                        if alias.asname:
                            line += f" as {bound}"
                    else:
                        line = f"import {mod}" + (f" as {bound}" if bound != mod.split(".")[0] else "")
                    imports[bound] = (line, mod)
                continue
            for name in _bound_names(stmt):
                defs[name] = _Definition(module, index, name, stmt)
        for d in defs.values():
            used = _used_names(d.node) - {d.name}
            for name in used:
                if name in defs:
                    d.deps.add((module, name))
                elif name in imports:
                    line, mod = imports[name]
                    if is_vendored_module(mod):
                        d.deps.add((mod, name))
                    else:
                        d.imports.add(line)
                        d.import_modules.add(mod)
        info = {"path": path, "shown": shown, "defs": defs}
        self._modules[module] = info
        return info

    @staticmethod
    def _check_user_import(mod: str, path: Path, shown: str) -> None:
        """A user module may import installed packages, not the user's other modules (not yet)."""
        top = mod.split(".")[0]
        if top in sys.stdlib_module_names:
            return
        local = path.parent / top
        if local.with_suffix(".py").is_file() or (local / "__init__.py").is_file():
            raise VendorError(
                f"{shown} imports {mod!r}, another module of your project: this version of fgc "
                "vendors only the module the config names; move what it uses into that module"
            )
        if importlib.util.find_spec(top) is None:
            raise VendorError(f"{shown} imports {mod!r}, which is not installed")

    def collect(self, wanted: list[tuple[str, str]]) -> VendoredCode:
        """Vendor ``(module, name)`` pairs and everything they use, deps before dependents."""
        order: list[_Definition] = []
        seen: set[tuple[str, str]] = set()

        def visit(module: str, name: str) -> None:
            if (module, name) in seen:
                return
            seen.add((module, name))
            d = self._module(module)["defs"].get(name)
            if d is None:
                raise VendorError(f"{self._module(module)['shown']} defines no top-level {name!r} to copy")
            if module in self._files:
                info = self._module(module)
                for mod in sorted(d.import_modules):
                    self._check_user_import(mod, info["path"], info["shown"])
            for dep in sorted(d.deps):
                visit(*dep)
            order.append(d)

        for module, name in sorted(wanted):
            visit(module, name)
        names = [d.name for d in order]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            places = sorted({self._module(d.module)["shown"] for d in order if d.name in dupes})
            raise VendorError(f"{', '.join(places)} define the same name(s) {dupes}: rename one")
        imports = sorted({line for d in order for line in d.imports})
        definitions = [
            (self._module(d.module)["shown"], d.name, cst.Module([]).code_for_node(d.node).strip("\n"))
            for d in order
        ]
        return VendoredCode(imports, definitions, set(names), {(d.module, d.name) for d in order})


def vendor_symbols(symbols, shown: Callable[[str], str]) -> VendoredCode:
    """Vendor every component-library or user-code symbol among SYMBOLS (with what they use).

    ``shown`` turns a user file's path into the name written in the generated code's comments.
    """
    wanted = set()
    files: dict[str, tuple[Path, str]] = {}
    for symbol in symbols:
        if symbol.is_user_code:
            files[symbol.module] = (Path(symbol.file), shown(symbol.file))
        elif not is_vendored_module(symbol.module):
            continue
        wanted.add((symbol.module, symbol.qualname.split(".")[0]))
    return Vendorer(files).collect(sorted(wanted))
