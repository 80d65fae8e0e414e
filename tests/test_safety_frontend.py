"""Safety of the frontend (issue #13, items 8 and 12): values from -D, the environment and files
reach the YAML only as data, and templates and YAML that would exhaust memory, time or the stack
are one-line errors at their line.

The bombs run in a subprocess under a memory (and CPU) limit, so that on code without the limits
they fail (killed, or a MemoryError traceback) instead of eating the machine.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import EXAMPLE, REPO
from fgc.cli import _parse_defines
from fgc.errors import FgcError
from fgc.frontend.loader import load
from fgc.frontend.render import render

LIB_TRAIN = REPO / "fgc" / "templates" / "lm" / "train.yaml"


def line_of(path: Path, text: str) -> int:
    """The 1-based line of PATH that holds TEXT (the first)."""
    return next(i for i, line in enumerate(path.read_text().split("\n"), 1) if text in line)


def limited(memory_gib: float = 2, cpu_s: int = 120):
    """A preexec_fn that caps the child's address space and CPU time."""

    def apply():
        size = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))

    return apply


def fgc(*args, cwd: Path, env: dict | None = None, memory_gib: float = 2, cpu_s: int = 120):
    """Run the fgc CLI under a memory and CPU limit."""
    return subprocess.run(
        [sys.executable, "-m", "fgc", *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        preexec_fn=limited(memory_gib, cpu_s),
    )


def assert_one_error(result: subprocess.CompletedProcess, where: str, message: str) -> None:
    """Exit status 2 and one `WHERE: error: ...MESSAGE...` line first, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{where}: error: "), result.stderr
    assert message in first, result.stderr
    assert "Traceback" not in result.stderr


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def python_value(graph, node_id):
    """The plain Python value of an IR node; fails on anything but data (a call, a variable)."""
    node = graph.node(node_id)
    assert node.kind in ("value", "list", "dict"), node.kind
    if node.kind == "value":
        return node.value
    if node.kind == "list":
        return [python_value(graph, c) for c in node.args]
    return {k: python_value(graph, v) for k, v in node.kwargs.items()}


def loaded_as(value):
    """VALUE as fgc's loader gives it back: mapping keys are strings."""
    if isinstance(value, list):
        return [loaded_as(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): loaded_as(v) for k, v in value.items()}
    return value


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def unique_keys(value) -> bool:
    """Whether no mapping in VALUE has two keys that load as the same string."""
    if isinstance(value, list):
        return all(unique_keys(v) for v in value)
    if isinstance(value, dict):
        keys = [k if isinstance(k, str) else str(k) for k in value]
        return len(set(keys)) == len(keys) and all(unique_keys(v) for v in value.values())
    return True


# ---------------------------------------------------------------- item 8: values are data


def test_the_define_exploit_builds_nothing_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    value = f'"!singleton:os:system [\\"touch {marker}\\"]"'
    result = fgc("build", EXAMPLE, "-o", out, "-D", f"warmup_steps={value}", cwd=tmp_path)
    line = line_of(LIB_TRAIN, "warmup: {{ ns.warmup_steps")
    # the string stays a string: a type error at the line that prints it
    assert_one_error(result, f"{LIB_TRAIN}:{line}", "warmup_cosine.warmup must be int")
    assert f"""got '!singleton:os:system ["touch {marker}"]'""" in result.stderr
    assert not marker.exists()
    assert not out.exists()


@pytest.mark.parametrize(
    "value, what",
    [
        ("!singleton:os:system [ls]", "the tag !singleton:os:system"),
        ("[1, !!str 2]", "the tag tag:yaml.org,2002:str"),
        ("&a [1]", "the anchor &a"),
        ("[*a]", "the alias *a"),
        ("{k: &b x}", "the anchor &b"),
    ],
)
def test_a_define_with_a_tag_an_anchor_or_an_alias_is_an_error(value, what):
    with pytest.raises(FgcError) as err:
        _parse_defines((f"x={value}",))
    (diag,) = err.value.diagnostics
    assert diag.loc.file == "<command line>"
    assert diag.message == f"-D x: values are plain data (scalars, lists, mappings); {what} is not allowed"


def test_a_define_with_a_tag_is_one_line_through_the_cli(tmp_path):
    write(tmp_path / "c.yaml", "a: {{ x }}\n")
    result = fgc("pp", "c.yaml", "-D", "x=!singleton:os:system [ls]", cwd=tmp_path)
    assert_one_error(result, "<command line>", "-D x: values are plain data")
    assert result.stdout == ""


DEFINE_TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(
        st.sampled_from(
            ["'", '"', "\\", "\n", " ", "#", ": ", "- ", ", ", "[", "]", "{", "}", "!", "&", "*", "|",
             ">", "%", "@", "`", "?", "~", "null", "yes", "1e-4", "0x10", ".inf", ".nan", "é", "\u2028",
             "\t", "a", "b", "1", "!!str", "&x", "*x", "!singleton:os:system [ls]", "---", "...",
             "\ufdd2", "\ufdd3", "{{", "}}"]
        ),
        min_size=1,
        max_size=8,
    ).map("".join),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=DEFINE_TEXT)
def test_any_define_loads_as_exactly_its_value(tmp_path_factory, text):
    """`-D x=TEXT` printed raw (`{{ x }}`) as a value, a list item and a flow mapping value loads as
    exactly the -D value, never as a tag, an anchor, an alias or other structure; inside an
    author's double quotes, a string keeps its exact value too."""
    try:
        value = _parse_defines((f"x={text}",))["x"]
    except FgcError as exc:
        (diag,) = exc.diagnostics
        assert diag.loc.file == "<command line>" and diag.message.startswith("-D x: ")
        return
    assume(unique_keys(value))
    cfg = write(
        tmp_path_factory.mktemp("d") / "c.yaml",
        "key: {{ x }}\nseq:\n    - {{ x }}\nflow: {k: {{ x }}}\n"
        + ('quoted: "<{{ x }}>"\n' if isinstance(value, str) else ""),
    )
    graph = load(render(cfg, variables={"x": value}))
    expected = loaded_as(value)
    assert same(python_value(graph, graph.targets["key"]), expected)
    assert same(python_value(graph, graph.targets["seq"]), [expected])
    assert same(python_value(graph, graph.targets["flow"]), {"k": expected})
    if isinstance(value, str):
        assert python_value(graph, graph.targets["quoted"]) == f"<{value}>"


def test_data_stays_data_through_string_operations(tmp_path):
    cfg = write(
        tmp_path / "c.yaml",
        'a: {{ x ~ "/suffix" }}\n'
        'b: {{ joinpath(x, "y") }}\n'
        "c: {{ x | upper }}\n"
        'd: {{ "%s!" % x }}\n'
        'e: {{ "{}?".format(x) }}\n'
        'f: {{ x + "+" }}\n'
        "g: {{ [x, 1] }}\n"
        'h: "run-{{ x }}"\n'
        "i: 'run-{{ x }}'\n"
        'j: {k: "{{ x }}"}\n'
        "-- for c in x[:2]\n"
        "l{{ loop.index }}: {{ c }}\n"
        "-- endfor\n"
        'm: {{ x.split(":")[0] }}\n',
    )
    x = "'a\": *b, !t &c"
    graph = load(render(cfg, variables=_parse_defines((f"x={json.dumps(x)}",))))
    got = {k: python_value(graph, v) for k, v in graph.targets.items()}
    assert got == {
        "a": x + "/suffix",
        "b": x + "/y",
        "c": x.upper(),
        "d": x + "!",
        "e": x + "?",
        "f": x + "+",
        "g": [x, 1],
        "h": f"run-{x}",
        "i": f"run-{x}",
        "j": {"k": x},
        "l1": "'",
        "l2": "a",
        "m": "'a\"",
    }


def test_data_cannot_become_a_tag(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: !singleton:{{ x }}\n")
    result = fgc("targets", "c.yaml", "-D", "x=builtins.print", cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", "data cannot be part of a YAML tag, anchor, alias or directive")


def test_data_with_a_line_break_cannot_go_inside_single_quotes(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: 'x{{ y }}'\n")
    result = fgc("pp", "c.yaml", "-D", 'y="1\\n2"', cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", "data printed inside ' text holds a line break")


def test_values_from_the_environment_and_from_files_are_data(tmp_path):
    model = tmp_path / "model"
    config = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 1, "_name_or_path": "x: !singleton:os:system [ls]"}
    write(model / "config.json", json.dumps(config))
    folder = tmp_path / "odd: !dir #1"
    cfg = write(
        folder / "c.yaml",
        "env: {{ getenv('FGC_TEST_VALUE') }}\n"
        f"hf: {{{{ hf_config({str(model)!r})._name_or_path }}}}\n"
        "here: {{ config_dir }}\n",
    )
    os.environ["FGC_TEST_VALUE"] = "*alias, &anchor !tag: [x]"
    try:
        graph = load(render(cfg))
    finally:
        del os.environ["FGC_TEST_VALUE"]
    got = {k: python_value(graph, v) for k, v in graph.targets.items()}
    assert got == {
        "env": "*alias, &anchor !tag: [x]",
        "hf": "x: !singleton:os:system [ls]",
        "here": str(folder.resolve()),
    }


def test_none_and_non_finite_floats_print_as_yaml(tmp_path):
    cfg = write(tmp_path / "c.yaml", "a: {{ none }}\nb: {{ x }}\nc: {{ y }}\nd: {{ [none, z] }}\n")
    graph = load(render(cfg, variables=_parse_defines(("x=.inf", "y=.nan", "z=-.inf"))))
    got = {k: python_value(graph, v) for k, v in graph.targets.items()}
    assert got["a"] is None and got["b"] == math.inf and math.isnan(got["c"])
    assert got["d"] == [None, -math.inf]


# ---------------------------------------------------------------- item 12: limits


def test_string_repetition_is_capped(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: {{ 'x' * 10**10 }}\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(
        result,
        "c.yaml:2",
        "'x' * 10000000000 would make a value of about 10000000000 characters; "
        "fgc's limit for one template value is 10000000 characters",
    )


@pytest.mark.parametrize(
    "expr, what",
    [
        ("'%10000000000d' % 1", "'%' would make"),
        ("'%*d' % (10**10, 1)", "'%' would make"),
        ("'{:>10000000000}'.format(1)", "format() would make"),
        ("'x' | center(10**10)", "the center filter would make"),
        ("'x'.ljust(10**10)", "str.ljust() would make"),
        ("('x' * 9000000) | replace('x', 'yyyy')", "the replace filter would make"),
        ("('x' * 9000000) ~ ('x' * 9000000)", "'~' would make"),
    ],
)
def test_widths_and_growing_operations_are_capped(tmp_path, expr, what):
    write(tmp_path / "c.yaml", f"a: 1\nb: {{{{ {expr} }}}}\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", what)
    assert "fgc's limit for one template value is 10000000 characters" in result.stderr


def test_integer_powers_are_capped(tmp_path):
    write(tmp_path / "c.yaml", "a: {{ 10 ** (10 ** 10) }}\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(
        result, "c.yaml:1", "10 ** 10000000000 would make a value of about 33219280948 bits; "
        "fgc's limit for one template value is 1000000 bits"
    )


def test_the_rendered_output_is_capped(tmp_path):
    write(tmp_path / "c.yaml", "-- for i in range(100)\nk{{ i }}: {{ 'x' * 9000000 }}\n-- endfor\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", "the rendered config is larger than 64 MiB (fgc's limit)")


@pytest.mark.parametrize(
    "text, lines",
    [
        ("-- for i in range(100000)\n-- for j in range(100000)\n-- endfor\n-- endfor\na: 1\n", [2]),
        # 2**61 calls: the limit is crossed at one of the two calls
        ("-- macro f(n)\n-- if n\n-- set _ = f(n - 1)\n-- set _ = f(n - 1)\n-- endif\n-- endmacro\n"
         "-- set _ = f(60)\na: 1\n", [3, 4]),
    ],
)
def test_loops_and_calls_are_capped(tmp_path, text, lines):
    write(tmp_path / "c.yaml", text)
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    line = int(result.stderr.split(":")[1]) if result.stderr.startswith("c.yaml:") else None
    assert line in lines, result.stderr
    assert_one_error(
        result, f"c.yaml:{line}", "the template ran more than 500000 loop iterations and calls (fgc's limit)"
    )


def test_a_macro_without_end_is_a_recursion_error_at_its_line(tmp_path):
    write(tmp_path / "c.yaml", "-- macro f(n)\n-- set _ = f(n + 1)\n-- endmacro\n-- set _ = f(0)\na: 1\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", "the template recurses too deeply")


def alias_bomb(levels: int) -> str:
    lines = [".a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f".a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_used_as_arguments_is_refused_at_its_line(tmp_path):
    write(
        tmp_path / "c.yaml",
        alias_bomb(9)
        + "model: !singleton:torch.nn:Linear [2, 2]\n"
        "optimizer: !partial:torch.optim:SGD\n"
        "    lr: 0.1\n"
        "    foreach: *a9\n"
        "trainer: !singleton:fgc.settings:BasicTrainer\n"
        "    data: !singleton:fgc.settings:DataSettings\n"
        "        data_dir: shards\n",
    )
    result = fgc("check", "c.yaml", cwd=tmp_path)
    # .a5 is the first value of more than a million nodes: 1 + 10 * (1 + 10 * ...)
    assert_one_error(
        result, "c.yaml:6", "this value holds more than 1000000 YAML nodes once its aliases are expanded"
    )


def test_deep_yaml_is_refused_at_the_line_that_crosses_the_limit(tmp_path):
    text = "a: 1\nb:\n" + "".join("    " * i + "k:\n" for i in range(1, 150)) + "    " * 150 + "v\n"
    write(tmp_path / "c.yaml", text)
    result = fgc("targets", "c.yaml", cwd=tmp_path)
    # b's mapping is level 1; the 100th `k:` (line 102) opens level 101
    assert_one_error(result, "c.yaml:102", "YAML nests deeper than 100 levels here (fgc's limit)")
    write(tmp_path / "d.yaml", "a: " + "[" * 500 + "]" * 500 + "\n")
    assert_one_error(fgc("targets", "d.yaml", cwd=tmp_path), "d.yaml:1", "YAML nests deeper than 100")


def test_a_deep_define_is_refused(tmp_path):
    write(tmp_path / "c.yaml", "a: {{ x }}\n")
    result = fgc("pp", "c.yaml", "-D", "x=" + "[" * 500 + "]" * 500, cwd=tmp_path)
    assert_one_error(result, "<command line>", "-D x: the value nests deeper than 100 levels (fgc's limit)")


def test_deeply_nested_statements_are_refused_at_their_line(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\n" + "-- if true\n" * 100 + "b: 2\n" + "-- endif\n" * 100)
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(result, "c.yaml:22", "statements nest deeper than 20 levels here (fgc's limit)")


def test_deeply_nested_expressions_are_not_called_a_cycle(tmp_path):
    write(tmp_path / "c.yaml", "a: 1\nb: {{ " + "(" * 300 + "1" + ")" * 300 + " }}\n")
    result = fgc("pp", "c.yaml", cwd=tmp_path)
    assert_one_error(result, "c.yaml:2", "the template nests too deeply for Jinja2")
    assert "cycle" not in result.stderr
