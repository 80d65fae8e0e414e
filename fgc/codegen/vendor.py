"""Vendoring: copy the source of the component classes a config uses into the generated package.

Component modules (``fgc.components.*``, and the families' parts, ``fgc.families.NAME.parts``) are parsed with libcst; only the top-level definitions the
package needs are kept (following names used inside them, across component modules), imports
between component modules are dropped (everything lands in one ``model.py``), and the remaining
imports are kept only when a kept definition uses the name they bind.

The user's own modules are copied the same way, with the project's modules they import
relatively (Forgather's model sources: ``from .layers import RMSNorm``, ``from . import
attention``): those imports are dropped, ``attention.CausalAttention`` becomes
``CausalAttention``, modules that import each other are fine (definitions, not modules, are
ordered), and a helper two modules both define is renamed ``NAME_MODULE`` in the one it came from.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import libcst as cst
import libcst.metadata  # noqa: F401  (cst.metadata: the user's names, by scope)

from fgc import cache

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
    # where the definition names another vendored definition: (the Name or ``module.NAME``
    # Attribute node, the (module, name) it stands for), so that a renamed one is renamed here too
    refs: list[tuple[cst.CSTNode, tuple[str, str]]] = field(default_factory=list)
    name_nodes: list[cst.Name] = field(default_factory=list)  # the names the statement binds
    # the statement's source as libcst prints it (library modules, read with ast: node is None)
    text: str | None = None

    def source(self) -> str:
        return self.text if self.node is None else cst.Module([]).code_for_node(self.node).strip("\n")


@dataclass
class VendoredCode:
    """What vendoring produced: import lines and definition source, in dependency order."""

    imports: list[str]
    definitions: list[tuple[str, str, str]]  # (module file, name, source)
    names: set[str]
    members: set[tuple[str, str]] = field(default_factory=set)  # (module, name) vendored
    # the definitions (by name) copied from the library unchanged: their text is the library's,
    # which is black-formatted (tests/test_cache.py), so it is not formatted again
    verbatim: set[str] = field(default_factory=set)

    def to_json(self) -> str:
        """The code as JSON (for :mod:`fgc.cache`), sets sorted: one text per result."""
        return json.dumps(
            {
                "imports": self.imports,
                "definitions": self.definitions,
                "names": sorted(self.names),
                "members": sorted(self.members),
                "verbatim": sorted(self.verbatim),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "VendoredCode":
        data = json.loads(text)
        return cls(
            list(data["imports"]),
            [tuple(d) for d in data["definitions"]],
            set(data["names"]),
            {tuple(m) for m in data["members"]},
            set(data["verbatim"]),
        )

    def holds(self, module: str, qualname: str) -> bool:
        """Whether the symbol module:qualname is defined in the vendored code."""
        return (module, qualname.split(".")[0]) in self.members


class VendorError(Exception):
    """Code that cannot be vendored (the caller adds the config location)."""


class _Rename(cst.CSTTransformer):
    """Renames the given Name nodes and turns ``module.NAME`` Attribute nodes into a bare name
    (nodes are matched by identity: only what scope analysis found is touched)."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.BaseExpression:
        new = self.names.get(id(original_node))
        return updated_node.with_changes(value=new) if new else updated_node

    def leave_Attribute(self, original_node: cst.Attribute, updated_node: cst.Attribute) -> cst.BaseExpression:
        new = self.names.get(id(original_node))
        return cst.Name(new) if new else updated_node


def _module_file(module: str) -> Path | None:
    """The source file of an imported module (None: none, e.g. a namespace package)."""
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = importlib.import_module(module)
        except Exception:
            return None
    file = getattr(mod, "__file__", None)
    return Path(file) if file else None


def _is_module(name: str) -> bool:
    """Whether NAME is a module (already imported, or importable)."""
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class Vendorer:
    """Collects the definitions a package needs from component modules and the user's own files.

    ``files`` maps a user module's (synthetic) name to its file and the name to show for it;
    the user's modules that those import relatively (``from .layers import X``, ``from . import
    attn``: Forgather's model sources) are found through the import system, as Python found them
    at build time, and shown by ``shown(path)``.
    """

    def __init__(
        self, files: dict[str, tuple[Path, str]] | None = None, shown: Callable[[str], str] | None = None
    ) -> None:
        self._modules: dict[str, dict] = {}
        self._files = files or {}
        self._shown = shown or (lambda path: Path(path).name)

    def _user_module(self, module: str, line: str, shown: str) -> None:
        """Register MODULE, which a user module imports relatively, as user code to vendor."""
        if module in self._files or is_vendored_module(module):
            return
        path = _module_file(module)
        if path is None or path.suffix != ".py":
            raise VendorError(f"{shown}: {line} names no module file that can be copied")
        self._files[module] = (path, self._shown(str(path)))

    def _relative(self, small: cst.ImportFrom, module: str, shown: str) -> list[tuple[str, str | None, str]]:
        """(absolute module, name or None for the module itself, bound name) for each alias of a
        relative import in MODULE."""
        line = cst.Module([]).code_for_node(small)
        if isinstance(small.names, cst.ImportStar):
            raise VendorError(f"{shown}: a star import ({line}) cannot be vendored; name what it uses")
        package = getattr(sys.modules.get(module), "__package__", None)
        level = "." * len(small.relative)
        target = cst.Module([]).code_for_node(small.module) if small.module else ""
        try:
            base = importlib.util.resolve_name(level + target, package)
        except (ImportError, ValueError):
            raise VendorError(f"{shown}: {line} does not resolve to a module of the project") from None
        out = []
        for alias in small.names:
            name = cst.Module([]).code_for_node(alias.name)
            bound = alias.asname.name.value if alias.asname else name
            if _is_module(f"{base}.{name}"):  # from . import attn: the module itself
                self._user_module(f"{base}.{name}", line, shown)
                out.append((f"{base}.{name}", None, bound))
            else:
                self._user_module(base, line, shown)
                out.append((base, name, bound))
        return out

    def _module(self, module: str) -> dict:
        if module in self._modules:
            return self._modules[module]
        user = module in self._files
        if user:
            path, shown = self._files[module]
        else:
            path = Path(importlib.import_module(module).__file__)
            root = Path(importlib.import_module("fgc").__file__).parent
            shown = f"fgc/{path.relative_to(root).as_posix()}"
        # the library's modules are copied verbatim: Python's own parser reads them (several
        # times faster than libcst's, a cold build's largest share after black)
        info = None if user else _library_module(module, path, shown)
        if info is None:
            info = self._cst_module(module, path, shown, user)
        self._modules[module] = info
        return info

    def _cst_module(self, module: str, path: Path, shown: str, user: bool) -> dict:
        """A module's top-level definitions, read with libcst (the user's modules: their names are
        tracked by scope, renamed and flattened; library modules ast cannot split like libcst)."""
        tree = cst.parse_module(path.read_text(encoding="utf-8"))
        wrapper = None
        if user:  # the user's names are tracked by scope: they may be renamed or flattened
            wrapper = cst.MetadataWrapper(tree)
            tree = wrapper.module
        defs: dict[str, _Definition] = {}
        imports: dict[str, tuple[str, str]] = {}  # bound name -> (import line source, source module)
        vendored_refs: dict[str, tuple[str, str]] = {}  # bound name -> the (module, name) it imports
        module_aliases: dict[str, str] = {}  # bound name -> a user module imported as a whole
        for index, stmt in enumerate(tree.body):
            if isinstance(stmt, cst.SimpleStatementLine) and any(
                isinstance(s, (cst.Import, cst.ImportFrom)) for s in stmt.body
            ):
                for small in stmt.body:
                    if isinstance(small, cst.ImportFrom) and small.relative:
                        if not user:
                            raise VendorError(
                                f"{shown}: a relative import ({cst.Module([]).code_for_node(small)}) "
                                "cannot be vendored; import the module by its absolute name"
                            )
                        for target, name, bound in self._relative(small, module, shown):
                            if name is None:
                                module_aliases[bound] = target
                            else:
                                vendored_refs[bound] = (target, name)
                for small, mod, bound in _import_aliases(stmt):
                    if isinstance(small, cst.ImportFrom):
                        if small.relative:
                            continue
                        alias = next(
                            a for a in small.names  # type: ignore[union-attr]
                            if (a.asname.name.value if a.asname else cst.Module([]).code_for_node(a.name)) == bound
                        )
                        original = cst.Module([]).code_for_node(alias.name)
                        line = f"from {mod} import {original}"
                        if alias.asname:
                            line += f" as {bound}"
                        if is_vendored_module(mod):
                            vendored_refs[bound] = (mod, original)
                            continue
                    else:
                        line = f"import {mod}" + (f" as {bound}" if bound != mod.split(".")[0] else "")
                    imports[bound] = (line, mod)
                continue
            for name in _bound_names(stmt):
                defs[name] = _Definition(module, index, name, stmt)
        for d in defs.values():
            _link(d, _used_names(d.node), module, defs, vendored_refs, imports)
        if wrapper is not None:
            self._track_user_names(wrapper, tree, shown, defs, vendored_refs, module_aliases, module)
        return {"path": path, "shown": shown, "defs": defs, "user": user}

    @staticmethod
    def _track_user_names(wrapper, tree, shown, defs, vendored_refs, module_aliases, module) -> None:
        """Find, by scope, where each definition of a user module names a top-level definition
        (its own module's or an imported one's) and each ``module.NAME`` of a module imported
        whole: those are its exact dependencies, and the places a renamed definition is renamed."""
        scope = wrapper.resolve(cst.metadata.ScopeProvider)[tree]
        parents = wrapper.resolve(cst.metadata.ParentNodeProvider)
        owner: dict[int, int] = {}  # id(Name node) -> the index of the top-level statement holding it

        class _Owner(cst.CSTVisitor):
            def __init__(self, index: int) -> None:
                self.index = index

            def visit_Name(self, node: cst.Name) -> None:
                owner[id(node)] = self.index

        for index, stmt in enumerate(tree.body):
            stmt.visit(_Owner(index))
        by_index: dict[int, list[_Definition]] = {}
        for d in defs.values():
            by_index.setdefault(d.index, []).append(d)
            node = d.node
            if isinstance(node, (cst.ClassDef, cst.FunctionDef)):
                d.name_nodes.append(node.name)
            else:
                for small in node.body:
                    targets = [t.target for t in small.targets] if isinstance(small, cst.Assign) else (
                        [small.target] if isinstance(small, cst.AnnAssign) else []
                    )
                    d.name_nodes += [t for t in targets if isinstance(t, cst.Name) and t.value == d.name]
        for assignment in scope.assignments:
            bound = assignment.name
            for access in assignment.references:
                node = access.node
                if not isinstance(node, cst.Name) or id(node) not in owner:
                    continue
                for d in by_index.get(owner[id(node)], []):
                    if bound in defs:
                        d.refs.append((node, (module, bound)))
                    elif bound in vendored_refs:
                        d.refs.append((node, vendored_refs[bound]))
                    elif bound in module_aliases:
                        parent = parents.get(node)
                        if not (isinstance(parent, cst.Attribute) and parent.value is node):
                            raise VendorError(
                                f"{shown}: {d.name} uses the module {bound!r} itself; its definitions are "
                                f"copied into one file, so only {bound}.NAME can be vendored"
                            )
                        target = (module_aliases[bound], parent.attr.value)
                        d.deps.add(target)
                        d.refs.append((parent, target))

    @staticmethod
    def _check_user_import(mod: str, path: Path, shown: str) -> None:
        """A user module may import installed packages, and its project's modules only relatively."""
        top = mod.split(".")[0]
        if top in sys.stdlib_module_names:
            return
        local = path.parent / top
        if local.with_suffix(".py").is_file() or (local / "__init__.py").is_file():
            raise VendorError(
                f"{shown} imports {mod!r}, another module of your project, by its absolute name: "
                f"import it relatively (from .{top} import NAME), so that fgc copies what it uses"
            )
        if importlib.util.find_spec(top) is None:
            raise VendorError(f"{shown} imports {mod!r}, which is not installed")

    def collect(self, wanted: list[tuple[str, str]]) -> VendoredCode:
        """Vendor ``(module, name)`` pairs and everything they use, deps before dependents.

        Two definitions of one name from different modules (two modules' ``_helper``) are kept
        apart: a definition of the user's that the config does not name is renamed
        ``NAME_MODULE`` wherever it is used; two that must keep the name are an error."""
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
        imports = sorted({line for d in order for line in d.imports})
        final = self._final_names(order, set(wanted), {_bound_by(line) for line in imports})
        definitions = []
        verbatim = set()
        for d in order:
            renames = {
                id(node): final[target] for node, target in d.refs if final.get(target, _ref_text(node)) != _ref_text(node)
            }
            renames.update({id(n): final[(d.module, d.name)] for n in d.name_nodes if final[(d.module, d.name)] != d.name})
            node = d.node.visit(_Rename(renames)) if renames else d.node
            if not renames and not self._module(d.module)["user"]:
                verbatim.add(final[(d.module, d.name)])
            text = d.source() if node is d.node else cst.Module([]).code_for_node(node).strip("\n")
            definitions.append((self._module(d.module)["shown"], final[(d.module, d.name)], text))
        return VendoredCode(
            imports,
            definitions,
            {final[(d.module, d.name)] for d in order},
            {(d.module, d.name) for d in order},
            verbatim,
        )

    def _final_names(
        self, order: list[_Definition], wanted: set[tuple[str, str]], imported: set[str]
    ) -> dict[tuple[str, str], str]:
        """The name each vendored definition has in the generated module."""
        groups: dict[str, list[_Definition]] = {}
        for d in order:
            groups.setdefault(d.name, []).append(d)
        final = {(d.module, d.name): d.name for d in order}
        taken = set(final.values()) | imported
        for name in sorted(groups):
            group = groups[name]
            if len(group) < 2 and name not in imported:
                continue
            movable = [d for d in group if self._module(d.module)["user"] and (d.module, d.name) not in wanted]
            staying = [d for d in group if d not in movable]
            if len(staying) > 1 or (staying and name in imported):
                places = sorted({self._module(d.module)["shown"] for d in staying})
                raise VendorError(f"{', '.join(places)} define the same name(s) {[name]}: rename one")
            for d in sorted(movable, key=lambda d: self._module(d.module)["shown"]):
                stem = re.sub(r"\W", "_", Path(self._module(d.module)["shown"]).stem)
                new, n = f"{name}_{stem}", 2
                while new in taken:
                    new, n = f"{name}_{stem}_{n}", n + 1
                taken.add(new)
                final[(d.module, d.name)] = new
        return final


def _link(d: _Definition, used: set[str], module: str, defs: dict, vendored_refs: dict, imports: dict) -> None:
    """Record what definition D uses among the names USED in it: its module's definitions,
    vendored definitions it imports, and the import lines of everything else."""
    for name in used - {d.name}:
        if name in defs:
            d.deps.add((module, name))
        elif name in vendored_refs:
            d.deps.add(vendored_refs[name])
        elif name in imports:
            line, mod = imports[name]
            d.imports.add(line)
            d.import_modules.add(mod)


_COMPOUND = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.If, ast.For, ast.AsyncFor, ast.While,
             ast.With, ast.AsyncWith, ast.Try, ast.Match) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


def _statement_spans(body: list[ast.stmt], lines: list[str]) -> list[tuple[int, int]] | None:
    """For each top-level statement, the range of LINES (0-based, end excluded) that libcst gives
    it: the blank and comment lines before it, the statement, and for a compound statement the
    comment lines after its block indented at least as deep as the block (its footer). None where
    the split is not this simple (two statements on a line, a block on its header's line)."""
    def first_line(stmt: ast.stmt) -> int:
        return min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", ())]) - 1

    spans: list[tuple[int, int]] = []
    start = 0
    for i, stmt in enumerate(body):
        first = first_line(stmt)
        end = stmt.end_lineno  # excluded
        if i == 0 and first > 0:  # lines before the first statement: libcst's module header
            return None
        if isinstance(stmt, _COMPOUND):
            inner = stmt.body[0]
            if lines[inner.lineno - 1][: inner.col_offset].strip():  # the block on its header's line
                return None
            nxt = first_line(body[i + 1]) if i + 1 < len(body) else len(lines)
            indent = len(lines[inner.lineno - 1]) - len(lines[inner.lineno - 1].lstrip(" \t"))
            for j in range(end, nxt):
                text = lines[j].lstrip(" \t")
                if text.startswith("#") and len(lines[j]) - len(text) >= indent:
                    end = j + 1
        if spans and spans[-1][1] > first:
            return None
        spans.append((start, end))
        start = end
    return spans


def _names_in(node: ast.AST) -> set[str]:
    """Every identifier in NODE, as libcst's Name nodes would give them (names, attributes,
    parameters, keywords, definitions, imports)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.keyword) and n.arg:
            out.add(n.arg)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.alias):
            out.update(n.name.split("."))
            if n.asname:
                out.add(n.asname)
        elif isinstance(n, ast.ImportFrom) and n.module:
            out.update(n.module.split("."))
        elif isinstance(n, (ast.Global, ast.Nonlocal)):
            out.update(n.names)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
        elif isinstance(n, (ast.MatchAs, ast.MatchStar)) and n.name:
            out.add(n.name)
        elif isinstance(n, ast.MatchMapping) and n.rest:
            out.add(n.rest)
        elif isinstance(n, ast.MatchClass):
            out.update(n.kwd_attrs)
    return out


def _library_module(module: str, path: Path, shown: str) -> dict | None:
    """A library module's top-level definitions, read with Python's ast: the same definitions,
    dependencies, import lines and text as libcst gives (tests/test_vendor_ast.py compares the
    two on every library module). None where its statements do not split simply by line."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    spans = _statement_spans(tree.body, lines)
    if spans is None:
        return None
    defs: dict[str, _Definition] = {}
    imports: dict[str, tuple[str, str]] = {}
    vendored_refs: dict[str, tuple[str, str]] = {}
    used: dict[int, set[str]] = {}
    for index, (stmt, (start, end)) in enumerate(zip(tree.body, spans)):
        if isinstance(stmt, ast.ImportFrom):
            if stmt.level:
                raise VendorError(
                    f"{shown}: a relative import ({ast.get_source_segment(source, stmt)}) "
                    "cannot be vendored; import the module by its absolute name"
                )
            for alias in stmt.names:
                if alias.name == "*":
                    continue
                bound = alias.asname or alias.name
                if is_vendored_module(stmt.module):
                    vendored_refs[bound] = (stmt.module, alias.name)
                    continue
                line = f"from {stmt.module} import {alias.name}" + (f" as {bound}" if alias.asname else "")
                imports[bound] = (line, stmt.module)
            continue
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                bound = alias.asname or alias.name.split(".")[0]
                line = f"import {alias.name}" + (f" as {bound}" if bound != alias.name.split(".")[0] else "")
                imports[bound] = (line, alias.name)
            continue
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [stmt.name]
        elif isinstance(stmt, ast.Assign):
            names = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            names = [stmt.target.id]
        else:
            names = []
        if names:
            text = "".join(lines[start:end]).strip("\n")
            used[index] = _names_in(stmt)
            for name in names:
                defs[name] = _Definition(module, index, name, None, text=text)
    for d in defs.values():
        _link(d, used[d.index], module, defs, vendored_refs, imports)
    return {"path": path, "shown": shown, "defs": defs, "user": False}


def _ref_text(node: cst.CSTNode) -> str:
    """The text of a reference node (a Name, or ``module.NAME``)."""
    return cst.Module([]).code_for_node(node)


def _bound_by(line: str) -> str:
    """The name an import line binds."""
    if " as " in line:
        return line.rsplit(" as ", 1)[1]
    if line.startswith("from "):
        return line.rsplit(" import ", 1)[1]
    return line.split()[1].split(".")[0]


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
    if not wanted:
        return VendoredCode([], [], set())
    if files:  # the user's own code: vendored afresh each time
        return Vendorer(files, shown).collect(sorted(wanted))
    # the library's alone: a function of what is wanted and of the library's (and this
    # module's) source, so a result of an earlier build is kept in fgc's cache
    key = cache.key("vendor", *(f"{m}:{n}" for m, n in sorted(wanted)), *_library_sources())
    hit = cache.get("vendor", key)
    if hit is not None:
        return VendoredCode.from_json(hit)
    vendored = Vendorer(files, shown).collect(sorted(wanted))
    cache.put("vendor", key, vendored.to_json())
    return vendored


@functools.lru_cache(maxsize=1)
def _library_sources() -> tuple[str, ...]:
    """Every source file vendoring of library code may read (the component library, the
    families' parts) and vendoring's own code, each as its path and text."""
    root = Path(importlib.import_module("fgc").__file__).parent
    paths = [Path(__file__), *sorted((root / "components").glob("*.py")), *sorted((root / "families").rglob("*.py"))]
    return tuple(f"{path.relative_to(root.parent).as_posix()}\n{path.read_text(encoding='utf-8')}" for path in paths)
