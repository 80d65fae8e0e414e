"""The runtime modules a package needs: the import closure of its generated code.

A package vendors only the ``fgc_runtime`` modules its ``train.py``, ``generate.py`` and
``model.py`` reach, so a DDP package carries no pipeline, DiLoCo or Triton code. The closure is
computed from the source text with :mod:`ast`, starting from the generated files:

- ``import fgc_runtime.x``, ``from fgc_runtime.x import y`` and, inside runtime modules, the
  relative ``from .x import y``, ``from . import x`` and ``from ..x import y`` are edges; in
  ``from P import n``, ``n`` is followed when ``P.n`` is a module of the runtime (else it is a name).
- Every import counts, those inside functions included: a module imported lazily is still one
  the program may run.
- Importing a module runs every package ``__init__.py`` on the way, so those come too (and what
  they import).
- The one import by name in the runtime is ``fgc_runtime.kernels._impl.triton_kernel("M", ...)``,
  which imports ``fgc_runtime.kernels.triton.M``. Its calls are edges only when the program runs
  Triton (:func:`picks_triton`: the select-kernels pass chose ``triton`` or ``mixed`` for some
  kernel); otherwise ``check_impl`` never returns ``"triton"`` and the call is never made. Any
  other import by a computed name (``importlib.import_module``, ``__import__``) in a reached
  module is a :class:`ClosureError`, so a package cannot fail at run time for a module the
  closure could not see: make such an import static, or add a rule to :data:`LOADERS`.

The result is sorted: builds stay byte-identical.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from fgc import cache

PACKAGE = "fgc_runtime"


@dataclass(frozen=True)
class Loader:
    """A runtime function that imports a module by name: a call ``function("M", ...)`` imports
    ``pattern.format(M)``. The one loader is the Triton kernels', so its calls are followed only
    when the program runs Triton (``triton`` of :func:`closure`)."""

    module: str  # where the function is defined (its own body may call importlib)
    function: str
    pattern: str  # the module a call imports, from its first argument


LOADERS = {
    "triton_kernel": Loader(f"{PACKAGE}.kernels._impl", "triton_kernel", f"{PACKAGE}.kernels.triton.{{}}"),
}
DYNAMIC_IMPORTS = {"import_module", "__import__"}


# the fields of a statement that hold statements (bodies, branches, handlers, match cases)
STATEMENT_LISTS = ("body", "orelse", "finalbody", "handlers", "cases")


def may_call(text: str) -> bool:
    """Whether source TEXT may import by a call (a loader of :data:`LOADERS` or one of
    :data:`DYNAMIC_IMPORTS`): only then must the closure walk its expressions too. A name that
    appears nowhere in the text cannot be called."""
    return any(name in text for name in (*LOADERS, *DYNAMIC_IMPORTS))


class ClosureError(Exception):
    """A runtime import the closure cannot resolve: an fgc bug, not a user mistake."""


def picks_triton(kernels: Mapping[str, Mapping[str, str]]) -> bool:
    """Whether the plan's kernel choices (``plan.kernels``: name → ``{"impl", "reason"}``) run
    Triton for some kernel, so the package needs ``fgc_runtime/kernels/triton/``."""
    return any(choice["impl"] in ("triton", "mixed") for choice in kernels.values())


def closure(sources: Mapping[str, str], runtime_dir: Path, triton: bool = False) -> list[str]:
    """The files of RUNTIME_DIR (the ``fgc_runtime`` package) that SOURCES (the generated
    Python files' text, by name) reach, as sorted paths relative to RUNTIME_DIR
    (``kernels/rms_norm.py``).

    TRITON: whether the program runs Triton kernels (the ``triton_kernel`` calls are followed).
    Raises :class:`ClosureError` for an import of a runtime module that does not exist, or an
    import by a computed name it has no rule for.
    """
    runtime_dir = Path(runtime_dir)
    own = Path(__file__).read_text(encoding="utf-8")
    found: set[str] = set()
    queue: list[tuple[str, bool, str]] = []  # (module, required, who imports it)

    def visit(text: str, module: str | None, is_package: bool, where: str) -> None:
        for target, required, line in _module_edges(text, module, is_package, triton, runtime_dir, own):
            queue.append((target, required, f"{where}:{line}"))

    for name in sorted(sources):
        visit(sources[name], None, False, name)
    while queue:
        module, required, where = queue.pop()
        parts = module.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[:n])
            rel = _module_file(runtime_dir, name)
            if rel is None:
                if n < len(parts) or required:
                    raise ClosureError(f"{where}: imports {name}, which is not a module of the runtime")
                break  # `from P import n`: n is a name defined in P
            if rel in found:
                continue
            found.add(rel)
            visit((runtime_dir / rel).read_text(encoding="utf-8"), name, rel.endswith("__init__.py"), rel)
    return sorted(found)


def _module_edges(text: str, module: str | None, is_package: bool, triton: bool, runtime_dir: Path, own: str):
    """The edges of one module (:func:`_edges` of its TEXT; MODULE None: a generated file),
    kept in fgc's cache: they depend on its text, where it sits, ``triton`` and this module's
    code (OWN). The one exception, a loader's call with a computed name when the program runs
    Triton, depends on the runtime's files too: such a module's edges are not kept."""
    key = cache.key("closure-edges", own, str(module), str(is_package), str(triton), text)
    hit = cache.get("closure-edges", key)
    if hit is not None:
        return [tuple(edge) for edge in json.loads(hit)]
    calls = may_call(text)
    # a runtime module that calls no loader: its import statements alone (fgc's own text, so
    # tests/test_closure.py checks every one against a parse of the whole module)
    tree = _import_statements(text) if module is not None and not calls else ast.parse(text)
    edges = list(_edges(tree, module, is_package, triton, runtime_dir, calls))
    if not (triton and calls):
        cache.put("closure-edges", key, json.dumps(edges))
    return edges


# the start of a line that begins an import statement
_IMPORT_LINE = re.compile(r"[ \t]*(?:import[ \t]|from[ \t]+\S+[ \t]+import\b)")
# what opens or closes a triple-quoted string, and the comment that hides one
_TRIPLE_OR_COMMENT = re.compile(r"\"\"\"|\'\'\'|#")


def _import_statements(text: str) -> ast.Module:
    """A module of the import statements of TEXT, each at its own line: the lines that start one
    outside a triple-quoted string, with their continuation lines (open parentheses, a trailing
    backslash), each parsed alone. Ten times faster than parsing the whole text, it reads lines,
    not tokens, so it relies on what fgc's runtime keeps to (and tests/test_tiny_runtime.py
    checks on every module): an import starts its line, and a triple quote in a one-line string
    never opens a block of code."""
    lines = text.splitlines()
    body: list[ast.stmt] = []
    quote = None  # the triple quote of the string that runs past the line's end, if any
    i = 0
    while i < len(lines):
        starts = quote is None and _IMPORT_LINE.match(lines[i])
        for mark in _TRIPLE_OR_COMMENT.finditer(lines[i]):
            if quote is None and mark.group() == "#":
                break
            if quote is None:
                quote = mark.group()
            elif mark.group() == quote:
                quote = None
        if not starts:
            i += 1
            continue
        start, depth = i, 0
        while True:
            code = lines[i].split("#", 1)[0]
            depth += code.count("(") - code.count(")")
            i += 1
            if i >= len(lines) or (depth <= 0 and not code.rstrip().endswith("\\")):
                break
        snippet = "\n".join([lines[start].lstrip(), *lines[start + 1 : i]])
        try:
            nodes = ast.parse(snippet).body
        except SyntaxError:  # prose that starts like an import
            continue
        for node in nodes:
            body.append(ast.increment_lineno(node, start))
    return ast.Module(body=body, type_ignores=[])


def _module_file(runtime_dir: Path, module: str) -> str | None:
    """MODULE's file relative to RUNTIME_DIR (``PACKAGE`` itself is ``__init__.py``), or None."""
    parts = module.split(".")[1:]
    for rel in ("/".join(parts) + ".py" if parts else None, "/".join([*parts, "__init__.py"])):
        if rel is not None and (runtime_dir / rel).is_file():
            return rel
    return None


def _edges(tree: ast.AST, module: str | None, is_package: bool, triton: bool, runtime_dir: Path, calls: bool = True):
    """(runtime module, required, line) for each import in TREE, the code of MODULE (None: a
    generated file). ``required`` is False for ``from P import n``'s ``P.n``, which may be a name.
    CALLS: whether TREE may call a loader or import by name (:func:`may_call`); without, only
    the statements are walked (a fifth of the nodes), not the expressions."""

    def ours(name: str) -> bool:
        return name == PACKAGE or name.startswith(PACKAGE + ".")

    def walk(node: ast.AST, function: str | None):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            yield from edge(child, function)
            yield from walk(child, inner)

    def statements(node: ast.AST):
        # imports are statements: only the bodies of statements can hold one
        for field in STATEMENT_LISTS:
            for child in getattr(node, field, None) or ():
                yield from edge(child, None)
                yield from statements(child)

    def edge(node: ast.AST, function: str | None):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if ours(alias.name):
                    yield alias.name, True, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            if base is None or not ours(base):
                return
            yield base, True, node.lineno
            for alias in node.names:
                if alias.name != "*":
                    yield f"{base}.{alias.name}", False, node.lineno
        elif isinstance(node, ast.Call):
            name = _called_name(node.func)
            arg = node.args[0] if node.args else None
            literal = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
            if name in LOADERS and module is not None:
                if not triton:
                    return
                loader = LOADERS[name]
                if literal is not None:
                    yield loader.pattern.format(literal), True, node.lineno
                else:  # a computed name: every module the loader could import
                    yield from _every_module(runtime_dir, loader.pattern.format("").rstrip("."), module, node.lineno)
            elif name in DYNAMIC_IMPORTS and module is not None:
                loader = next((l for l in LOADERS.values() if (l.module, l.function) == (module, function)), None)
                if loader is not None:
                    return  # the loader's own import: its callers are the edges
                if literal is not None and not ours(literal):
                    return  # a third-party or standard-library module
                if literal is not None:
                    yield literal, True, node.lineno
                    return
                raise ClosureError(
                    f"{module}:{node.lineno}: imports a module by a computed name, which the closure of "
                    "fgc/codegen/closure.py cannot follow: make the import static or add a rule to LOADERS"
                )

    yield from walk(tree, None) if calls else statements(tree)


def _called_name(func: ast.expr) -> str | None:
    """``f`` of a call ``f(...)`` or ``x.f(...)``."""
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _resolve(node: ast.ImportFrom, module: str | None, is_package: bool) -> str | None:
    """The absolute module a ``from ... import`` names (None: relative outside the runtime)."""
    if node.level == 0:
        return node.module
    if module is None:
        return None  # a generated file is no package: it has no relative imports of ours
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 >= len(parts):
        raise ClosureError(f"{module}:{node.lineno}: a relative import beyond the top of the runtime")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _every_module(runtime_dir: Path, package: str, module: str, line: int):
    """An edge to each module of PACKAGE (a package of the runtime), for a call in MODULE at LINE."""
    rel = _module_file(runtime_dir, package)
    if rel is None:
        raise ClosureError(f"{module}:{line}: a loader imports from {package}, which is not a package of the runtime")
    for path in sorted((runtime_dir / rel).parent.rglob("*.py")):
        sub = path.relative_to(runtime_dir).with_suffix("").parts
        if sub[-1] == "__init__":
            sub = sub[:-1]
        yield ".".join([PACKAGE, *sub]), True, line
