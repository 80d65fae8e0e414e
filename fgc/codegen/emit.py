"""Emission: IR nodes → Python syntax (libcst), never by pasting config text into code.

Every value becomes a literal node; a call becomes a call of an imported (or vendored) name;
a partial becomes ``functools.partial``; a singleton that is shared, named with ``@name``, or sits
under a factory (which may run more than once) becomes one variable, named after its config path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import libcst as cst

from fgc.errors import FgcError
from fgc.ir import IRGraph, Node
from fgc_lowering.specs import Symbol

from .escape import is_python_name, python_identifier
from .vendor import VendoredCode


# the parameter of train.py's config_factories(): the parsed command line, whose attributes are
# the config's own flags
FLAGS_PARAM = "flags"

_TIGHT_EQUAL = cst.AssignEqual(
    whitespace_before=cst.SimpleWhitespace(""), whitespace_after=cst.SimpleWhitespace("")
)


def literal(value) -> cst.BaseExpression:
    """A Python literal for a scalar config value."""
    if value is None or isinstance(value, bool):
        return cst.Name(repr(value))
    if isinstance(value, int):
        node: cst.BaseExpression = cst.Integer(str(abs(value)))
        return cst.UnaryOperation(cst.Minus(), node) if value < 0 else node
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return cst.Call(cst.Name("float"), [cst.Arg(cst.SimpleString(repr(text)))])
        node = cst.Float(repr(abs(value)))
        return cst.UnaryOperation(cst.Minus(), node) if math.copysign(1, value) < 0 else node
    if isinstance(value, str):
        return cst.SimpleString(repr(value))
    if isinstance(value, (list, tuple)):
        elements = [cst.Element(literal(v)) for v in value]
        return cst.List(elements) if isinstance(value, list) else cst.Tuple(elements)
    if isinstance(value, dict):
        return cst.Dict([cst.DictElement(literal(k), literal(v)) for k, v in value.items()])
    raise TypeError(f"no literal for {type(value).__name__}")


def dotted(name: str) -> cst.BaseExpression:
    """``a.b.c`` as an attribute chain."""
    parts = name.split(".")
    expr: cst.BaseExpression = cst.Name(parts[0])
    for part in parts[1:]:
        expr = cst.Attribute(expr, cst.Name(part))
    return expr


def code(node: cst.CSTNode) -> str:
    """Source text of a libcst node."""
    return cst.Module(body=[]).code_for_node(node)


def _identifier(text: str) -> str:
    """A Python name made from config text (see :func:`fgc.codegen.escape.python_identifier`)."""
    return python_identifier(text)


def variable_name(node: Node) -> str:
    """A Python name from a node's @name or its config path (``model.layer_factory`` → ``model_layer_factory``)."""
    return _identifier(node.name or node.id)


@dataclass
class ImportTable:
    """The imports a generated module needs: ``import module`` lines, plus vendored names."""

    modules: set[str] = field(default_factory=set)

    def reference(self, symbol: Symbol, vendored: VendoredCode | None) -> cst.BaseExpression:
        """An expression naming the symbol: bare if vendored into this module, else module.qualname."""
        if vendored is not None and vendored.holds(symbol.module, symbol.qualname):
            return dotted(symbol.qualname)
        self.modules.add(symbol.module)
        return dotted(f"{symbol.module}.{symbol.qualname}")

    def statements(self) -> list[str]:
        return [f"import {m}" for m in sorted(self.modules)]


class TargetEmitter:
    """Emits the statements that construct one target of the IR."""

    def __init__(
        self,
        ir: IRGraph,
        symbols: dict[str, Symbol],
        imports: ImportTable,
        vendored: VendoredCode | None = None,
        flags: dict[str, str] | None = None,
    ):
        self.ir = ir
        # node id -> NAME: values that the config's own train.py flags replace at run time
        # (fgc_lowering.dynamic_args), emitted as FLAGS_PARAM.NAME
        self.flags = flags or {}
        self.symbols = symbols
        self.imports = imports
        self.vendored = vendored
        self.variables: dict[str, str | None] = {}  # !var names met, with their default node

    def emit(self, target: str, var: str | None = None) -> tuple[list[cst.BaseStatement], str]:
        """Statements building ``target``; returns them and the variable holding the result."""
        statements, names = self.emit_targets([target], {target: var} if var else None)
        return statements, names[target]

    def emit_targets(
        self, targets: list[str], names: dict[str, str] | None = None
    ) -> tuple[list[cst.BaseStatement], dict[str, str]]:
        """Statements building several targets, sharing what the config shares between them."""
        roots = {self.ir.targets[t]: t for t in targets}
        order = self._order(list(roots))
        within = set(order)
        under_factory = self._under_factory(order)
        hoisted: dict[str, str] = {}
        names_used: dict[str, str] = {}
        statements: list[cst.BaseStatement] = []
        for nid in order:
            node = self.ir.node(nid)
            shared = self.ir.uses(nid, within) > 1
            hoist = nid in roots or (
                node.kind == "call"
                and node.mode != "factory"
                and (shared or node.name or (node.mode == "singleton" and nid in under_factory))
            ) or (node.kind in ("dict", "list") and shared)
            if not hoist:
                continue
            given = (names or {}).get(roots.get(nid, ""))
            name = given or (variable_name(node) if nid not in roots else _identifier(roots[nid]))
            if name in names_used and names_used[name] != nid:
                raise FgcError(
                    f"two nodes would both be named {name!r} in generated code",
                    node.loc,
                    hint=f"the other is at {self.ir.node(names_used[name]).loc}; give one an @name",
                )
            if self.flags and name == FLAGS_PARAM:  # it would hide the parsed command line
                raise FgcError(
                    f"a node would be named {name!r} in generated code, the name of the config's flags there",
                    node.loc,
                    hint="give it another @name",
                )
            names_used[name] = nid
            value = self.expression(nid, hoisted)
            hoisted[nid] = name
            statements.append(
                cst.SimpleStatementLine([cst.Assign([cst.AssignTarget(cst.Name(name))], value)])
            )
        return statements, {t: hoisted[nid] for nid, t in roots.items()}

    def _order(self, roots: list[str]) -> list[str]:
        """Nodes below the roots, children first; a !var's default is not part of the body."""
        return self.ir.reachable(*roots, var_defaults=False)

    def _under_factory(self, order: list[str]) -> set[str]:
        """Nodes reachable through a factory call (which may be evaluated more than once)."""
        out: set[str] = set()
        for nid in order:
            node = self.ir.node(nid)
            if node.kind == "call" and node.mode == "factory":
                out.update(n for n in self._order([nid]) if n != nid)
        return out

    def expression(self, nid: str, hoisted: dict[str, str], top: bool = True) -> cst.BaseExpression:
        if not top and nid in hoisted:
            return cst.Name(hoisted[nid])
        node = self.ir.node(nid)
        sub = lambda c: self.expression(c, hoisted, top=False)  # noqa: E731
        if nid in self.flags:  # the parsed flag (its default is the build-time value)
            return cst.Attribute(cst.Name(FLAGS_PARAM), cst.Name(self.flags[nid]))
        if node.kind == "value":
            try:
                return literal(node.value)
            except TypeError:
                raise FgcError(f"cannot emit a value of type {type(node.value).__name__}", node.loc) from None
        if node.kind == "list":
            return cst.List([cst.Element(sub(c)) for c in node.args])
        if node.kind == "tuple":
            return cst.Tuple([cst.Element(sub(c)) for c in node.args])
        if node.kind == "dict":
            return cst.Dict([cst.DictElement(literal(k), sub(c)) for k, c in node.kwargs.items()])
        if node.kind == "var":
            self.variables[node.value] = node.default
            return cst.Name(_identifier(node.value))
        if node.kind == "call":
            symbol = self.symbols[nid]
            if symbol.is_user_code and not (self.vendored and self.vendored.holds(symbol.module, symbol.qualname)):
                raise FgcError(
                    f"{symbol.spec!r} is the project's own code: this version of fgc vendors it "
                    "only for the model, optimizer and lr_scheduler targets and `fgc code`",
                    node.loc,
                )
            func = self.imports.reference(symbol, self.vendored)
            args = [cst.Arg(sub(c)) for c in node.args]
            for key, c in node.kwargs.items():
                if is_python_name(key):
                    args.append(cst.Arg(sub(c), keyword=cst.Name(key), equal=_TIGHT_EQUAL))
                else:
                    args.append(cst.Arg(cst.Dict([cst.DictElement(literal(key), sub(c))]), star="**"))
            if node.mode == "partial":
                self.imports.modules.add("functools")
                return cst.Call(dotted("functools.partial"), [cst.Arg(func), *args])
            return cst.Call(func, args)
        raise FgcError(f"cannot emit a {node.kind} node here", node.loc)
