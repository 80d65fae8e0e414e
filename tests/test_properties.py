"""Property tests: any scalar value goes through pp, load and `fgc code` unchanged."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import yaml

from fgc.frontend.loader import load
from fgc.frontend.render import render
from fgc.inspect import construction_module, load_for_code

TRICKY = st.sampled_from(
    ["'", '"', "''", "##", " ## x", "\\", "\\n", "\n", "{{ x }}", "{% if %}", "#", ": ", "- ", "~",
     "null", "True", "1e-4", "0x10", ".inf", "é", "日本", "\u2028", "\t", "[a]", "*x", "&y", "!tag"]
)
strings = st.one_of(
    st.text(max_size=60),
    st.lists(TRICKY, min_size=1, max_size=6).map("".join),
    st.text(min_size=2000, max_size=3000, alphabet="ab# '\"\\{}%\n"),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    strings,
)


class _AnyTag(yaml.SafeLoader):
    pass


_AnyTag.add_multi_constructor("!", lambda loader, suffix, node: None)


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=scalars)
def test_scalar_through_pp_load_and_code(tmp_path_factory, value):
    tmp = tmp_path_factory.mktemp("prop")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(
        "## a comment line\n"
        "plain: {{ value | toyaml }}\n"
        "called: !singleton:builtins:list\n"
        "    - [{{ value | toyaml }}]\n"
    )
    rendered = render(cfg, variables={"value": value})
    ir = load(rendered)
    assert same(ir.node("plain").value, value)

    # pp's output is plain YAML holding the same value (any YAML reader agrees)
    assert same(yaml.load(rendered.text, Loader=_AnyTag)["plain"], value)

    # fgc code emits it as a literal that evaluates to the same value
    _, ir2, ctx = load_for_code(cfg, variables={"value": value})
    namespace: dict = {}
    exec(compile(construction_module(ir2, ctx, ["plain", "called"], "cfg.yaml"), "<code>", "exec"), namespace)
    built = namespace["construct"]()
    assert same(built["plain"], value)
    assert len(built["called"]) == 1 and same(built["called"][0], value)  # list([value])
