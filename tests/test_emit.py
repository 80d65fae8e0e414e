"""Emission and vendoring: the code fgc writes means what the config means."""

from __future__ import annotations

import functools
import math
import sys
import textwrap

import libcst as cst
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fgc.codegen.emit import ImportTable, TargetEmitter, code, literal
from fgc.codegen.vendor import Vendorer
from fgc.frontend.loader import load
from fgc.frontend.render import render, search_path_for
from fgc_lowering.context import LoweringContext
from fgc_lowering.passes.bind_arguments import BindArguments
from fgc_lowering.passes.resolve_callables import ResolveCallables
from fgc_lowering.passes.resolve_variables import ResolveVariables

HELPERS = '''
class Box:
    def __init__(self, *items, **named):
        self.items = items
        self.named = named

def pair(a, b=0):
    return (a, b)
'''


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    (tmp_path / "emit_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("emit_helpers", None)
    yield
    sys.modules.pop("emit_helpers", None)


def emit_and_run(tmp_path, text: str, target: str):
    """Build TARGET from config TEXT via emitted code; return (object, source)."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(text))
    ir = load(render(cfg))
    ctx = LoweringContext(cfg, search_path_for(cfg))
    for p in (ResolveVariables(), ResolveCallables(), BindArguments()):
        ir = p.run(ir, ctx)
    assert not ctx.sink.errors, ctx.sink.errors
    imports = ImportTable(set())
    statements, var = TargetEmitter(ir, ctx.symbols, imports).emit(target)
    source = "\n".join(imports.statements() + [code(s) for s in statements])
    namespace: dict = {}
    exec(compile(source, "<emitted>", "exec"), namespace)
    return namespace[var], source


def test_singleton_alias_is_shared(tmp_path, helpers):
    box, source = emit_and_run(
        tmp_path,
        """
        .inner: &inner !singleton:emit_helpers:Box [1]
        outer: !singleton:emit_helpers:Box
            - *inner
            - *inner
        """,
        "outer",
    )
    assert box.items[0] is box.items[1]
    assert box.items[0].items == (1,)
    assert "inner = emit_helpers.Box(1)" in source  # named after its config path


def test_factory_alias_gives_fresh_objects(tmp_path, helpers):
    box, _ = emit_and_run(
        tmp_path,
        """
        .inner: &inner !factory:emit_helpers:Box [1]
        outer: !singleton:emit_helpers:Box [*inner, *inner]
        """,
        "outer",
    )
    assert box.items[0] is not box.items[1]
    assert box.items[0].items == box.items[1].items == (1,)


def test_singleton_under_a_factory_stays_single(tmp_path, helpers):
    box, _ = emit_and_run(
        tmp_path,
        """
        .leaf: &leaf !singleton:emit_helpers:Box []
        .made: &made !factory:emit_helpers:Box [*leaf]
        outer: !singleton:emit_helpers:Box [*made, *made]
        """,
        "outer",
    )
    first, second = box.items
    assert first is not second
    assert first.items[0] is second.items[0]


def test_partial_and_keywords(tmp_path, helpers):
    made, source = emit_and_run(
        tmp_path,
        """
        fn: !partial:emit_helpers:pair
            b: 2
        """,
        "fn",
    )
    assert isinstance(made, functools.partial)
    assert made(1) == (1, 2)
    assert "functools.partial(emit_helpers.pair, b=2)" in source


def test_non_identifier_keys_are_passed_safely(tmp_path, helpers):
    box, _ = emit_and_run(
        tmp_path,
        """
        outer: !singleton:emit_helpers:Box
            not-an-identifier: 1
            class: 2
        """,
        "outer",
    )
    assert box.named == {"not-an-identifier": 1, "class": 2}


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False),
    st.text(max_size=200),
)


@settings(max_examples=300, deadline=None)
@given(st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner), max_leaves=8))
def test_literal_round_trips(value):
    text = code(literal(value))
    assert eval(text) == value


def test_literal_special_floats():
    assert math.isinf(eval(code(literal(float("inf")))))
    assert math.isnan(eval(code(literal(float("nan")))))
    assert code(literal(-0.0)) == "-0.0"


def test_vendoring_keeps_only_what_is_used():
    vendored = Vendorer().collect([("fgc.components.norm", "RMSNorm")])
    assert [name for _, name, _ in vendored.definitions] == ["RMSNorm"]
    assert "from fgc_runtime.kernels import rms_norm" in vendored.imports
    assert not any("swiglu" in line or "apply_rope" in line for line in vendored.imports)
    # the copied source is the component's own class, byte for byte
    cst.parse_module(vendored.definitions[0][2])


def test_vendoring_follows_dependencies_across_modules():
    vendored = Vendorer().collect([("fgc.components.causal_lm", "CausalLM")])
    names = [name for _, name, _ in vendored.definitions]
    assert names.index("DecoderStack") < names.index("CausalLM")
    assert all("fgc.components" not in line for line in vendored.imports)
